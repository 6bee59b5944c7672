"""The real PanDA server (panda-server from PyPI, PostgreSQL from Debian) for tests.

``../shared/tools/real-panda`` (beside the repository) brings it up on
127.0.0.1; it needs root and Debian packages. Where it cannot run, the
tests that need it skip and say why. The tool is copied to a writable
directory of the test session and run with ports of its own, once per
session and version (a cold start is a few minutes, mostly pip).

The server is run as it ships (``PANDA_NO_PATCH=1``): its v1
``update_event_ranges`` answers HTTP 500 after writing, and the pilot must
cope with that. Jobs are submitted through the server's own
``/api/v1/job/submit`` with its own ``JobSpec``, by a script of ours run in
the server's venv; the Adder pass is the daemon's (``add_main`` runs it
through ``TaskBufferInterface``, which keeps the file changes when the job
travels to the database process; a bare ``taskBuffer`` loses them).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO.parent / "shared" / "tools" / "real-panda"
QUEUE = "LOCAL_TEST"

SUBMIT = r'''
"""Submit one job described by a JSON argument through /api/v1/job/submit."""
import json, os, sys, time
import requests
from pandaserver.taskbuffer.FileSpec import FileSpec
from pandaserver.taskbuffer.JobSpec import JobSpec
from pandaserver.taskbuffer import JobUtils

spec = json.loads(sys.argv[1])
tag = f"{int(time.time() * 1000)}"
job = JobSpec()
job.jobDefinitionID = 1
job.jobName = f"pilottest.{tag}"
job.transformation = spec.get("transformation", "https://example.invalid/trf.sh")
job.jobParameters = spec.get("jobPars", "")
job.destinationDBlock = f"pilottest.{tag}.out"
job.destinationSE = "local"
job.currentPriority = 2000
job.prodSourceLabel = "managed"
job.computingSite = spec.get("site", "LOCAL_TEST")
job.VO = "atlas"
job.cloud = "US"
job.coreCount = 1
job.attemptNr = 1
job.maxAttempt = 1
job.maxWalltime = 600
job.jobsetID = spec.get("jobsetID", 1)
if spec.get("es"):
    job.jediTaskID = 1
    job.taskID = 1
    job.jobsetID = 1001
    job.eventService = 1
    job.specialHandling = "eventservice"
    f = FileSpec()
    f.lfn, f.GUID, f.scope = "EVNT.localtest.pool.root.1", "6f1e0c2a-0000-4000-8000-000000000001", "local"
    f.dataset = f.prodDBlock = f.dispatchDBlock = "localtest.es.in"
    f.type, f.status, f.jediTaskID, f.datasetID, f.fileID = "input", "ready", 1, 1, 1
    job.addFile(f)
for lfn in spec.get("outputs", []):
    f = FileSpec()
    f.lfn = lfn
    f.destinationDBlock = f.dataset = job.destinationDBlock
    f.destinationSE = "local"
    f.type = "output"
    f.scope = "pilottest"
    job.addFile(f)
f = FileSpec()
f.lfn = f"pilottest.{tag}.log.tgz"
f.destinationDBlock = f.dataset = job.destinationDBlock
f.destinationSE = "local"
f.type = "log"
f.scope = "pilottest"
job.addFile(f)
url = f"http://127.0.0.1:{os.environ['PANDA_DEV_PORT']}/api/v1/job/submit"
r = requests.post(url, data={"jobs": JobUtils.dump_jobs_json([job])}, timeout=120)
print(r.status_code, r.text)
'''

ADDER = r'''
"""One pass of the server's Adder, as its daemon add_main runs it."""
import os
import pandaserver.taskbuffer.TaskBufferInterface  # noqa: F401 - keeps FileSpec changes
from pandaserver.brokerage.SiteMapper import SiteMapper
from pandaserver.config import panda_config
from pandaserver.dataservice.adder_gen import AdderGen
from pandaserver.taskbuffer.TaskBuffer import taskBuffer

taskBuffer.init(panda_config.dbhost, panda_config.dbpasswd, nDBConnection=1, useTimeout=True)
mapper = SiteMapper(taskBuffer)
pid = f"pilot-tests-{os.getpid()}"
n = 0
for panda_id, status, attempt, _ in taskBuffer.listJobOutputReport(
    only_unlocked=True, time_limit=10, limit=1000, grace_period=0
):
    if taskBuffer.lockJobOutputReport(panda_id=panda_id, attempt_nr=attempt, pid=pid, time_limit=10):
        AdderGen(taskBuffer, panda_id, status, attempt, siteMapper=mapper, pid=pid, prelock_pid=pid).run()
        n += 1
print(n)
'''


CACHE_SCHEDCONFIG = r'''
"""One pass of the server's cache_schedconfig daemon (the queues' JSON the pilot reads)."""
from pandaserver.daemons.scripts import cache_schedconfig

cache_schedconfig.main(argv=["cache_schedconfig"])
print("cached")
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def unavailable() -> str | None:
    """Why the real server cannot be brought up here, or None."""
    if not (TOOL / "up.sh").is_file():
        return f"the real PanDA server tool is not there ({TOOL})"
    if os.geteuid() != 0:
        return "the real PanDA server tool needs root"
    if not shutil.which("apt-get") and not Path("/usr/lib/postgresql/15/bin/initdb").exists():
        return "the real PanDA server needs Debian's PostgreSQL 15 (no apt-get here)"
    return None


@dataclass
class RealPanda:
    """A running real server: its URL and the ways the tests look into it."""

    version: str
    root: Path
    tool: Path
    port: int
    pgport: int
    bring_up_seconds: float = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def python(self) -> str:
        return str(self.root / "venv" / "bin" / "python")

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PANDA_", "PYTHONPATH"))}
        env.update(
            PANDA_LOCAL_ROOT=str(self.root),
            PANDA_PORT=str(self.port),
            PANDA_PGPORT=str(self.pgport),
            PANDA_SERVER_VERSION=self.version,
            PANDA_NO_PATCH="1",
            PANDA_HOME=str(self.home),
            PANDA_DEV_PORT=str(self.port),
            PANDA_DEV_SCHEDCONFIG_DIR=str(self.root / "cache" / "schedconfig"),
            PYTHONPATH=str(self.home),
        )
        return env

    def sql(self, query: str) -> str:
        cmd = ["psql", "-h", str(self.root / "pgsock"), "-p", str(self.pgport), "-U", "postgres"]
        out = subprocess.run(
            [*cmd, "-d", "panda_db", "-tAc", query],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return out.stdout.strip()

    def _run(self, script: str, *args: str, timeout: float = 300) -> str:
        path = self.home / f"pilottests_{abs(hash(script)) % 10**8}.py"
        if not path.exists():
            path.write_text(script, encoding="utf-8")
        out = subprocess.run(
            [self.python, str(path), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.home,
            env=self.env(),
        )
        if out.returncode != 0:
            raise RuntimeError(f"{path.name} failed: {out.stderr[-2000:]}")
        return out.stdout.strip()

    def submit(self, **spec: Any) -> int:
        """A job through the server's own submit; returns its PandaID once activated."""
        if spec.get("es"):  # the task, its input and 4 event ranges, reset (one ES job a time)
            sql_file = self.home / "add_es_task.sql"
            cmd = ["psql", "-h", str(self.root / "pgsock"), "-p", str(self.pgport)]
            subprocess.run(
                [*cmd, "-U", "postgres", "-d", "panda_db", "-q", "-f", str(sql_file)],
                capture_output=True,
                check=True,
                timeout=60,
            )
        line = self._run(SUBMIT, json.dumps(spec)).splitlines()[-1]
        status, body = line.split(" ", 1)
        assert status == "200", line
        import ast  # the server answers a form post with a Python repr

        panda_id = int(ast.literal_eval(body)["data"][0][0])
        for _ in range(60):
            if self.sql(
                f"SELECT jobstatus FROM doma_panda.jobsactive4 WHERE pandaid={panda_id}"
            ) in ("activated",):
                return panda_id
            time.sleep(0.5)
        raise AssertionError(f"job {panda_id} never activated")

    def add_queue(self, name: str, **changes: Any) -> dict[str, Any]:
        """A copy of the kit's queue under ``name`` (as CRIC would list a clone), cached.

        The server reads its queues from ``schedconfig_json``; the per-queue JSON
        the pilot downloads is written by one pass of ``cache_schedconfig``.
        """
        data = json.loads(
            self.sql(f"SELECT data FROM doma_panda.schedconfig_json WHERE panda_queue='{QUEUE}'")
        )
        data.update(panda_resource=name, nickname=name, siteid=name, **changes)
        text = json.dumps(data).replace("'", "''")
        self.sql(
            f"DELETE FROM doma_panda.schedconfig_json WHERE panda_queue='{name}';"
            " INSERT INTO doma_panda.schedconfig_json (panda_queue, data, last_update)"
            f" VALUES ('{name}', '{text}', now())"
        )
        self._run(CACHE_SCHEDCONFIG)
        return data

    def adder(self) -> int:
        return int(self._run(ADDER).splitlines()[-1])

    def job_row(
        self,
        panda_id: int,
        cols: str = "jobstatus, starttime, endtime, piloterrorcode, transexitcode",
    ) -> dict[str, str]:
        for table in ("jobsarchived4", "jobsactive4"):
            row = self.sql(f"SELECT {cols} FROM doma_panda.{table} WHERE pandaid={panda_id}")
            if row:
                return dict(zip([c.strip() for c in cols.split(",")], row.split("|")))
        return {}

    def files(self, panda_id: int) -> list[dict[str, str]]:
        cols = ["lfn", "type", "status", "fsize", "checksum", "guid"]
        rows = self.sql(
            f"SELECT {', '.join(cols)} FROM doma_panda.filestable4 WHERE pandaid={panda_id}"
            " ORDER BY row_id"
        )
        return [dict(zip(cols, r.split("|"))) for r in rows.splitlines() if r]

    def events(self, panda_id: int) -> list[tuple[int, int]]:
        """(job_processid, status) of the ES task's ranges given to ``panda_id``."""
        rows = self.sql(
            "SELECT job_processid, status FROM doma_panda.jedi_events WHERE jeditaskid=1"
            f" AND pandaid={panda_id} ORDER BY job_processid"
        )
        return [tuple(int(x) for x in r.split("|")) for r in rows.splitlines() if r]  # type: ignore[misc]

    def remove(self) -> None:
        shutil.rmtree(self.root.parent, ignore_errors=True)

    def down(self) -> None:
        subprocess.run(
            ["bash", str(self.tool / "down.sh")],
            env=self.env(),
            capture_output=True,
            timeout=120,
        )


def bring_up(version: str) -> RealPanda:
    """Copy the tool to a directory of its own and bring the server up there.

    Not under pytest's temporary directories: those are private to root, and
    PostgreSQL runs as its own user, which must reach its data directory.
    RuntimeError with the tool's log on failure.
    """
    base = Path(tempfile.mkdtemp(prefix=f"pilot-tests-panda-{version}-"))
    base.chmod(0o755)
    tool = base / "tool"
    shutil.copytree(TOOL, tool)
    server = RealPanda(version, base / "root", tool, _free_port(), _free_port())
    start = time.monotonic()
    log = base / "up.log"
    with open(log, "wb") as out:
        proc = subprocess.run(
            ["bash", str(tool / "up.sh")],
            env=server.env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=1500,
        )
    server.bring_up_seconds = time.monotonic() - start
    text = log.read_text(errors="replace")
    if proc.returncode != 0 or "'success': True" not in text:  # is_alive, as a repr
        server.down()
        server.remove()
        raise RuntimeError(f"real PanDA {version} did not come up:\n{text[-3000:]}")
    print(f"real PanDA {version} up on {server.url} in {server.bring_up_seconds:.0f} s")
    return server
