"""Pilot profiles: how a pilot under commissioning is started and what it expects of a job.

A profile says which command starts the pilot, with what environment, how
many jobs one process takes (the PanDA pilot takes one and ends), how many
processes may run at once, and its transformation conventions: the PanDA
pilot's ``generic`` plugin runs only a transform given as a URL on a known
host, which it copies from ``$HARVESTER_WORKDIR`` when that is set. So that
the same templates serve every pilot, a profile turns a template's job into
the job that pilot would be given for the same work.

Shipped profiles: ``this`` (this pilot, ``pilot run``) and ``pilot3`` (the
PanDA pilot 3, run from its unpacked source, see :class:`PandaPilot3`). Any
other value is a command line (placeholders ``{url}``, ``{host}``,
``{port}``, ``{queue}``, ``{workdir}``, ``{queuedata_url}``,
``{storagedata_url}``, ``{token_file}``, ``{python}``), run once for many
jobs, or a JSON file ``{"command", "env", "jobs_per_process", "slots",
"transform": "as-is"|"url"}``.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pilot.errors import ErrorCode, PilotError

#: A base URL the PanDA pilot's generic plugin accepts (it copies from $HARVESTER_WORKDIR).
KNOWN_TRF_BASE = "http://pandaserver-doma.cern.ch:25080/trf/user"
PANDA_PILOT_VERSION = "3.7.0.36"
SDIST_ENV = "PANDA_PILOT_SDIST"
CACHE = Path.home() / ".cache" / "pilot-tests"
THIS_PILOT = "{python} -m pilot.cli run --url {url} --queue {queue} --workdir {workdir}"


@dataclass
class RunContext:
    """Where one pilot runs: its dispatcher, its clone, its directories."""

    url: str
    host: str
    port: int
    queue: str
    workdir: Path
    token_file: Path | None = None

    @property
    def pilot_workdir(self) -> Path:
        return self.workdir / "work"

    @property
    def trf_dir(self) -> Path:
        return self.workdir / "trf"

    @property
    def queuedata_url(self) -> str:
        return f"{self.url}/cache/schedconfig/{self.queue}.all.json"

    @property
    def schedconf_url(self) -> str:
        return f"{self.url}/cache/schedconfig/{self.queue}.json"

    @property
    def storagedata_url(self) -> str:
        return f"{self.url}/cache/ddmendpoints.json"

    def values(self) -> dict[str, Any]:
        return {
            "python": shlex.quote(sys.executable),
            "url": self.url,
            "host": self.host,
            "port": self.port,
            "queue": self.queue,
            "workdir": shlex.quote(str(self.pilot_workdir)),
            "queuedata_url": self.queuedata_url,
            "storagedata_url": self.storagedata_url,
            "token_file": shlex.quote(str(self.token_file or "")),
        }

    def base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("X509", "OIDC"))}
        if self.token_file is not None:  # the dispatcher's token, where PanDA pilots look for one
            env.update(
                OIDC_AUTH_TOKEN=str(self.token_file.resolve()), OIDC_AUTH_ORIGIN="atlas.pilot"
            )
        return env


@dataclass
class Profile:
    """A command-line pilot: the base for the shipped ones."""

    name: str
    command: str = THIS_PILOT
    env: dict[str, str] = field(default_factory=dict)
    jobs_per_process: int = 0  # 0: one process takes every job of its queue
    slots: int = 1  # processes of this pilot at once
    transform: str = "as-is"  # or "url": the generic plugin's convention
    version: str = ""

    def prepare(self, ctx: RunContext) -> None:
        """Make what the pilot needs before the first process starts."""
        ctx.workdir.mkdir(parents=True, exist_ok=True)
        ctx.pilot_workdir.mkdir(parents=True, exist_ok=True)
        ctx.trf_dir.mkdir(parents=True, exist_ok=True)

    def argv(self, ctx: RunContext, n: int) -> list[str]:
        """Process ``n``'s command line (a shell runs a free-form command)."""
        return ["/bin/sh", "-c", self.command.format(**ctx.values())]

    def cwd(self, ctx: RunContext) -> Path | None:
        return ctx.workdir

    def environment(self, ctx: RunContext) -> dict[str, str]:
        return {**ctx.base_env(), **self.env}

    def job_for(self, job: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
        """The template's job as this pilot is given it."""
        job = dict(job)
        if self.transform == "url":
            job["transformation"] = url_transform(str(job.get("transformation", "")), ctx.trf_dir)
        return job

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "jobs_per_process": self.jobs_per_process,
            "slots": self.slots,
            "transform": self.transform,
        }


def url_transform(transformation: str, trf_dir: Path) -> str:
    """The generic plugin's form of ``transformation``: a URL on a known host.

    A bare command that exists here (``python3``) becomes a script of that
    name in ``trf_dir`` which runs it; a name that exists nowhere stays
    missing, and the pilot meets a transform it cannot fetch, as it would
    on the grid. A URL is left as it is (its script must be in ``trf_dir``).
    """
    if "://" in transformation:
        return transformation
    name = transformation.rsplit("/", 1)[-1]
    found = shutil.which(transformation)
    if found and name:
        script = trf_dir / name
        script.write_text(f'#!/bin/sh\nexec {shlex.quote(found)} "$@"\n', encoding="utf-8")
        script.chmod(0o755)
    return f"{KNOWN_TRF_BASE}/{name}"


# -- the PanDA pilot 3 ------------------------------------------------------------------------

#: Pilot 3's own settings (read from $HARVESTER_PILOT_CONFIG) changed for a short test:
#: a heartbeat every 20 s instead of 30 min, and no waiting for a proxy or an HPC wrap-up.
PILOT3_CONFIG = {"heartbeat": "20", "debug_heartbeat": "20"}


def find_pilot3(given: str | Path | None = None) -> Path | None:
    """The PanDA pilot source: ``given``, ``$PANDA_PILOT_SDIST`` or the tests' cache."""
    for candidate in (given, os.environ.get(SDIST_ENV)):
        if candidate:
            return Path(candidate)
    found = sorted(CACHE.glob("panda-pilot-*.tar.gz"))
    return found[-1] if found else None


def unpack_pilot3(source: Path, into: Path) -> Path:
    """The directory holding ``pilot.py``: ``source`` itself or the sdist unpacked in ``into``."""
    if source.is_dir():
        top = source
    else:
        if not source.is_file():
            raise PilotError(ErrorCode.NOSUCHFILE, f"PanDA pilot source {source} not found")
        into.mkdir(parents=True, exist_ok=True)
        try:
            with tarfile.open(source) as tar:
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(into, filter="data")
                else:  # pragma: no cover - Python < 3.11.4
                    tar.extractall(into)  # noqa: S202 - the operator's own sdist
        except (OSError, tarfile.TarError) as exc:
            raise PilotError(ErrorCode.NOSUCHFILE, f"cannot unpack {source}: {exc}") from None
        tops = [p for p in into.iterdir() if p.is_dir()]
        top = tops[0] if len(tops) == 1 else into
    if not (top / "pilot.py").is_file():
        raise PilotError(ErrorCode.NOSUCHFILE, f"{source} holds no pilot.py of the PanDA pilot")
    return top


@dataclass
class PandaPilot3(Profile):
    """The PanDA pilot 3 (``pilot.py`` of its sdist), kept on 127.0.0.1 and harmless.

    - ``PILOT_NOKILL=1`` and a new session: at the end of a job it otherwise
      kills every process group of the user whose parent is PID 1;
    - every description comes from the dispatcher: the queue
      (``--queuedata-url``), CRIC's form (``$LOCAL_AGIS_SCHEDCONF``) and the
      storage endpoints (``--storagedata-url``);
    - the transform is copied from ``$HARVESTER_WORKDIR`` (see
      :func:`url_transform`), nothing is downloaded;
    - ``-t`` (no proxy check), ``--use-https False``, ``--use-rucio-traces False``;
    - its own configuration file (``$HARVESTER_PILOT_CONFIG``) with a short heartbeat.

    It takes one job per process, so the run starts one process per job,
    ``slots`` at a time.
    """

    name: str = "pilot3"
    source: Path | None = None
    jobs_per_process: int = 1
    slots: int = 2
    transform: str = "url"
    version: str = PANDA_PILOT_VERSION
    home: Path | None = None

    def prepare(self, ctx: RunContext) -> None:
        super().prepare(ctx)
        if shutil.which("curl") is None:
            raise PilotError(ErrorCode.SETUPFAILURE, "the PanDA pilot needs curl, not installed")
        if self.source is None:
            raise PilotError(
                ErrorCode.NOSUCHFILE,
                "PanDA pilot 3 source not found: give --pilot3-dir (an unpacked sdist or the"
                f" .tar.gz), set ${SDIST_ENV}, or put panda-pilot-{PANDA_PILOT_VERSION}.tar.gz in"
                f" {CACHE} (pip download --no-deps --no-binary :all: panda-pilot=="
                f"{PANDA_PILOT_VERSION} -d {CACHE})",
            )
        self.home = unpack_pilot3(self.source, ctx.workdir / "panda-pilot")
        version = self.home / "PILOTVERSION"
        if version.is_file():
            self.version = version.read_text(encoding="utf-8").strip() or self.version
        default = self.home / "pilot" / "util" / "default.cfg"
        if default.is_file():
            (ctx.workdir / "pilot3.cfg").write_text(
                _patched_config(default.read_text(encoding="utf-8"), PILOT3_CONFIG),
                encoding="utf-8",
            )

    def argv(self, ctx: RunContext, n: int) -> list[str]:
        q = ctx.queue
        work = ctx.pilot_workdir / f"p{n}"
        work.mkdir(parents=True, exist_ok=True)
        # sh leads the new session, so the PanDA pilot may make a process group of its own
        # (it calls setpgid, which a session leader may not); "; exit" keeps sh from exec'ing
        return [
            "/bin/sh", "-c", '"$@"; exit $?', "sh",
            sys.executable, "pilot.py", "-q", q, "-r", q, "-s", q,
            "--pilot-user", "generic", "-w", "generic", "-j", "managed",
            "--url", f"http://{ctx.host}", "-p", str(ctx.port),
            "--queuedata-url", ctx.queuedata_url, "--storagedata-url", ctx.storagedata_url,
            "-a", str(work), "-d", "-t", "-v", "1",
            "--use-https", "False", "--use-rucio-traces", "False",
        ]  # fmt: skip

    def cwd(self, ctx: RunContext) -> Path | None:
        return self.home

    def environment(self, ctx: RunContext) -> dict[str, str]:
        env = {k: v for k, v in ctx.base_env().items() if not k.startswith("PANDA")}
        env.update(
            PILOT_NOKILL="1",
            LOCAL_AGIS_SCHEDCONF=ctx.schedconf_url,
            HARVESTER_WORKDIR=str(ctx.trf_dir),
            PYTHONNOUSERSITE="1",
        )
        cfg = ctx.workdir / "pilot3.cfg"
        if cfg.is_file():
            env["HARVESTER_PILOT_CONFIG"] = str(cfg)
        env.pop("PYTHONPATH", None)
        return {**env, **self.env}


def _patched_config(text: str, values: dict[str, str]) -> str:
    """``text`` (an INI file) with each ``key: value`` line of ``values`` replaced."""
    out = []
    for line in text.splitlines():
        key = line.split(":", 1)[0].strip()
        if ":" in line and not line.lstrip().startswith("#") and key in values:
            line = f"{key}: {values[key]}"
        out.append(line)
    return "\n".join(out) + "\n"


def resolve(spec: str, *, pilot3_dir: str | Path | None = None, label: str = "") -> Profile:
    """A profile from ``spec``: a shipped name, a JSON profile file, or a command line."""
    if spec == "this":
        return Profile(name=label or "this")
    if spec == "pilot3":
        return PandaPilot3(name=label or "pilot3", source=find_pilot3(pilot3_dir))
    if spec.endswith(".json") and Path(spec).is_file():
        try:
            data = json.loads(Path(spec).read_text(encoding="utf-8"))
            if data.get("transform", "as-is") not in ("as-is", "url"):
                raise ValueError(f"transform must be as-is or url, not {data['transform']!r}")
            return Profile(
                name=label or str(data.get("name") or Path(spec).stem),
                command=str(data["command"]),
                env={str(k): str(v) for k, v in (data.get("env") or {}).items()},
                jobs_per_process=int(data.get("jobs_per_process", 0)),
                slots=max(1, int(data.get("slots", 1))),
                transform=str(data.get("transform", "as-is")),
                version=str(data.get("version", "")),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise PilotError(ErrorCode.CONVERSIONFAILURE, f"pilot profile {spec}: {exc}") from None
    return Profile(name=label or "custom", command=spec)
