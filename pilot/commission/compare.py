"""``pilot commission``: a template suite through two pilots at once, each on its queue clone.

As PanDA commissions a pilot: one embedded dispatcher serves two clones of
the same queue (``<queue>_A`` for the first pilot, ``<queue>_B`` for the
second, or names given), N jobs of every template of the suite wait on
each, and both pilots run at the same time, each started as its profile
says (see :mod:`pilot.commission.profiles`). The server's records are the
only evidence compared (:mod:`pilot.commission.report`); the report is
printed as a table, and written as JSON and as one SVG picture per suite
when asked.

See docs/commissioning.md (and docs/DESIGN.md for the package layout).

A run that is stopped (SIGTERM, SIGINT) or whose time is up ends every
pilot process it started, with their whole trees, before it exits.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from pilot.commission import picture, report
from pilot.commission.panda import PandaServer, outcome_from_description
from pilot.commission.profiles import Profile, RunContext, resolve
from pilot.commission.queues import Clone, load_clones
from pilot.commission.runner import PilotDriver, log_tail, waiting_jobs
from pilot.commission.templates import Template, load_templates, parse_template, template_from_job
from pilot.errors import PilotError
from pilot.server.serve import EmbeddedServer

SIDES = report.SIDES


def load_suite_jobs(
    server: EmbeddedServer,
    templates: list[Template],
    profile: Profile,
    ctx: RunContext,
    n_jobs: int,
) -> dict[str, list[int]]:
    """N jobs of every template on ``ctx.queue``, interleaved; PandaIDs by template."""
    ids: dict[str, list[int]] = {t.name: [] for t in templates}
    for _ in range(n_jobs):
        for t in templates:
            job = profile.job_for(t.job, ctx)
            job.pop("PandaID", None)
            job["computingSite"] = ctx.queue
            if t.task is not None:
                task = {**t.task, "job": job, "nJobs": 1}
                task.pop("jediTaskID", None)
                ids[t.name] += server.load_task(task)["PandaIDs"]
            else:
                ids[t.name] += server.load_jobs([job])
    return ids


def _drive(
    profiles: dict[str, Profile],
    ctxs: dict[str, RunContext],
    waiting: dict[str, Callable[[], int]],
    n_jobs: dict[str, int],
    timeout: float,
    stop: threading.Event,
) -> dict[str, dict[str, Any]]:
    """Both pilots at once, each on its clone, until done, timed out or stopped."""
    drivers = {s: PilotDriver(profiles[s], ctxs[s], waiting[s], n_jobs[s], timeout) for s in SIDES}
    for d in drivers.values():
        d.start()
    try:
        while any(d.is_alive() for d in drivers.values()):
            if stop.wait(0.5):
                break
    finally:
        for d in drivers.values():
            d.stop()
        for d in drivers.values():
            d.join()
    return {
        s: {
            "started": d.result.started,
            "exit_codes": d.result.exit_codes,
            "elapsed": d.result.elapsed,
            "timed_out": d.result.timed_out,
            "stopped": d.result.stopped,
        }
        for s, d in drivers.items()
    }


def _report(
    templates: list[Template],
    profiles: dict[str, Profile],
    queues: dict[str, str],
    jobs: dict[str, dict[str, list[report.JobOutcome]]],
    **extra: Any,
) -> dict[str, Any]:
    names = {s: profiles[s].name for s in SIDES}
    rows = [
        report.compare_template(t, {s: jobs[s][t.name] for s in SIDES}, names) for t in templates
    ]
    return {
        "clones": queues,
        "names": names,
        "pilots": {s: profiles[s].describe() for s in SIDES},
        "suites": sorted({x for t in templates for x in t.suites}),
        **extra,
        "templates": rows,
    }


def run_commission(
    templates: list[Template],
    profiles: dict[str, Profile],
    clones: dict[str, Clone],
    workdir: Path,
    *,
    n_jobs: int = 3,
    timeout: float = 900.0,
    stop: threading.Event | None = None,
    original_queue: str = "",
) -> dict[str, Any]:
    """Run both sides at once on the embedded dispatcher and return the report."""
    workdir.mkdir(parents=True, exist_ok=True)
    stop = stop or threading.Event()
    started = time.monotonic()
    with EmbeddedServer(workdir / "dispatcher.db") as server:
        assert server.store is not None
        for clone in clones.values():
            server.store.put_queue(clone.name, clone.queue)
            if clone.storages:
                server.store.put_storages(clone.storages)
        ctxs, ids = {}, {}
        for s in SIDES:
            ctxs[s] = RunContext(
                server.url, server.host, server.port, clones[s].name, workdir / s.lower(),
                server.token_file,
            )  # fmt: skip
            profiles[s].prepare(ctxs[s])
            ids[s] = load_suite_jobs(server, templates, profiles[s], ctxs[s], n_jobs)
        drives = _drive(
            profiles, ctxs,
            {s: partial(waiting_jobs, server.store, ctxs[s].queue) for s in SIDES},
            {s: sum(len(v) for v in ids[s].values()) for s in SIDES}, timeout, stop,
        )  # fmt: skip
        jobs = {
            s: {t: [report.read_outcome(server.store, p) for p in v] for t, v in ids[s].items()}
            for s in SIDES
        }
    return _report(
        templates, profiles, {s: clones[s].name for s in SIDES}, jobs,
        server="embedded", queue=original_queue, jobs_per_template=n_jobs, drives=drives,
        stopped=stop.is_set(), elapsed=round(time.monotonic() - started, 2),
    )  # fmt: skip


def run_commission_panda(
    templates: list[Template],
    profiles: dict[str, Profile],
    queues: dict[str, str],
    panda: PandaServer,
    workdir: Path,
    *,
    n_jobs: int = 1,
    timeout: float = 900.0,
    settle: float = 180.0,
    stop: threading.Event | None = None,
) -> dict[str, Any]:
    """The suite on a real PanDA server: submitted to its two queues, read back from it."""
    workdir.mkdir(parents=True, exist_ok=True)
    stop = stop or threading.Event()
    started = time.monotonic()
    es = [t.name for t in templates if t.task is not None]
    if es:
        raise PilotError(
            1008, f"event-service templates {es} need a JEDI task: not submitted to a real server"
        )
    where = urllib.parse.urlsplit(panda.url)
    ctxs: dict[str, RunContext] = {}
    ids: dict[str, dict[str, list[int]]] = {}
    for s in SIDES:
        ctxs[s] = RunContext(
            panda.url, where.hostname or "127.0.0.1", where.port or 25443, queues[s],
            workdir / s.lower(),
        )  # fmt: skip
        profiles[s].prepare(ctxs[s])
        ids[s] = {t.name: [] for t in templates}
        for _ in range(n_jobs):
            for t in templates:
                job = profiles[s].job_for(t.job, ctxs[s])
                job["computingSite"] = queues[s]
                ids[s][t.name].append(panda.submit(job))
    every = {s: [p for v in ids[s].values() for p in v] for s in SIDES}
    drives = _drive(
        profiles, ctxs, {s: partial(panda.waiting, every[s]) for s in SIDES},
        {s: len(every[s]) for s in SIDES}, timeout, stop,
    )  # fmt: skip
    if not stop.is_set():
        panda.settle(every["A"] + every["B"], settle)
    found = panda.describe(every["A"] + every["B"])
    jobs = {
        s: {t: [outcome_from_description(p, found.get(p)) for p in v] for t, v in ids[s].items()}
        for s in SIDES
    }
    return _report(
        templates, profiles, dict(queues), jobs, server=panda.url, queue="",
        jobs_per_template=n_jobs, drives=drives, stopped=stop.is_set(),
        elapsed=round(time.monotonic() - started, 2),
    )  # fmt: skip


def _templates(args: argparse.Namespace) -> list[Template]:
    if args.from_job:
        out = []
        for path in args.from_job:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            jobs = data if isinstance(data, list) else data.get("jobs", [data])
            for k, job in enumerate(jobs):
                name = f"{Path(path).stem}-{k + 1}" if len(jobs) > 1 else Path(path).stem
                out.append(parse_template(template_from_job(job, name), name))
        return out
    suite = None if (args.only or args.templates) and args.suite == "default" else args.suite
    return load_templates(args.templates, args.only, suite)


def _check_panda_args(args: argparse.Namespace) -> None:
    """Options that cannot apply to a real server are refused, never ignored."""
    if not args.panda_python:
        raise PilotError(
            1008, "--panda-url needs --panda-python: PanDA's own JobSpec makes the jobs"
        )
    for option in ("queue_description", "storage_endpoints", "remote_storage"):
        if getattr(args, option):
            raise PilotError(
                1008,
                f"--{option.replace('_', '-')} does not apply with --panda-url: the server's"
                " queues are described where it reads them (CRIC)",
            )


def main(argv: list[str] | None = None) -> int:
    """Exit 0 when the pilots agree on every template, 1 when not, 2 on bad input."""
    parser = argparse.ArgumentParser(prog="pilot commission", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--pilot-a", default="this", help="profile of the first pilot: this, pilot3, a profile"
        " JSON file, or a command line with placeholders ({url}, {queue}, {workdir}, ...)",
    )  # fmt: skip
    parser.add_argument("--pilot-b", default="this", help="profile of the second pilot")
    parser.add_argument("--name-a", default="", help="the first pilot's name in the report")
    parser.add_argument("--name-b", default="")
    parser.add_argument(
        "--pilot3-dir", default=None,
        help="the PanDA pilot 3 source (unpacked sdist or .tar.gz; default $PANDA_PILOT_SDIST,"
        " else ~/.cache/pilot-tests/panda-pilot-*.tar.gz)",
    )  # fmt: skip
    parser.add_argument("--suite", default="default", help="default, all, or of short, failure,"
                        " long, container, es (comma-separated)")  # fmt: skip
    parser.add_argument("--templates", default=None, help="directory of template JSON files")
    parser.add_argument("--only", nargs="*", default=None, help="template names to run")
    parser.add_argument(
        "--from-job", action="append", default=[],
        help="a real job definition (JSON: one job, a list, or {jobs: [...]}) as a template;"
        " repeatable",
    )  # fmt: skip
    parser.add_argument("--jobs", type=int, default=3, help="jobs per template and pilot")
    parser.add_argument("--queue", default=None, help="queue to clone (default COMMISSION)")
    parser.add_argument(
        "--queue-description", default=None,
        help="the queue's schedconfig/CRIC JSON (file or URL) to clone",
    )  # fmt: skip
    parser.add_argument(
        "--storage-endpoints", default=None, help="its storage endpoints (ddmendpoints JSON)"
    )
    parser.add_argument("--clone-a", default=None, help="name of the first clone (<queue>_A)")
    parser.add_argument("--clone-b", default=None, help="name of the second clone (<queue>_B)")
    parser.add_argument(
        "--remote-storage", action="store_true",
        help="keep the endpoints' own protocols and copytools (default: local directories, mv)",
    )  # fmt: skip
    parser.add_argument("--slots-a", type=int, default=0, help="processes at once (profile's)")
    parser.add_argument("--slots-b", type=int, default=0)
    parser.add_argument("--workdir", default="commission-work")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds the pilots may take")
    parser.add_argument(
        "--panda-url", default=None,
        help="a real PanDA server: submit to its two queues (--clone-a/--clone-b, or <--queue>_A"
        " and _B, which must exist there) and read the results back",
    )  # fmt: skip
    parser.add_argument(
        "--panda-python", default=None,
        help="with --panda-url: an interpreter with PanDA's taskbuffer, to submit the jobs",
    )  # fmt: skip
    parser.add_argument(
        "--settle", type=float, default=180.0,
        help="with --panda-url: seconds to wait for the server to reach final states",
    )  # fmt: skip
    parser.add_argument("--json", default=None, help="write the report here as JSON")
    parser.add_argument("--svg-dir", default=None, help="write one SVG picture per suite here")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    base = Path(args.workdir).resolve()
    try:
        templates = _templates(args)
        if not templates:
            raise PilotError(1008, "no templates selected")
        profiles = {
            "A": resolve(args.pilot_a, pilot3_dir=args.pilot3_dir, label=args.name_a),
            "B": resolve(args.pilot_b, pilot3_dir=args.pilot3_dir, label=args.name_b),
        }
        if profiles["A"].name == profiles["B"].name:  # the same pilot twice: "this-A", "this-B"
            for s in SIDES:
                profiles[s].name += f"-{s}"
        for s, slots in (("A", args.slots_a), ("B", args.slots_b)):
            if slots > 0:
                profiles[s].slots = slots
            elif profiles[s].jobs_per_process > 0:  # one process per job: all at once
                profiles[s].slots = max(profiles[s].slots, len(templates) * args.jobs)
        if args.panda_url:
            _check_panda_args(args)
            queue = args.queue or "COMMISSION"
            queues = {"A": args.clone_a or f"{queue}_A", "B": args.clone_b or f"{queue}_B"}
            panda = PandaServer(args.panda_url, args.panda_python)
        queue = args.queue or ("" if args.queue_description else "COMMISSION")
        original, clones = load_clones(
            args.queue_description, args.storage_endpoints,
            [args.clone_a or "{queue}_A", args.clone_b or "{queue}_B"], queue=queue or None,
            storage_root=None if args.remote_storage else base / "storage",
        )  # fmt: skip
    except (PilotError, OSError, ValueError) as exc:
        diag = (exc.detail or exc.diag) if isinstance(exc, PilotError) else str(exc)
        print(f"pilot commission: {diag}", file=sys.stderr)
        return 2
    stop = threading.Event()
    got: list[int] = []

    def _stop(signum: int, frame: object) -> None:
        got.append(signum)
        stop.set()

    old = {s: signal.signal(s, _stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        if args.panda_url:
            result = run_commission_panda(
                templates, profiles, queues, panda, base, n_jobs=args.jobs,
                timeout=args.timeout, settle=args.settle, stop=stop,
            )  # fmt: skip
        else:
            result = run_commission(
                templates, profiles, dict(zip(SIDES, clones)), base, n_jobs=args.jobs,
                timeout=args.timeout, stop=stop, original_queue=original,
            )  # fmt: skip
    except PilotError as exc:
        print(f"pilot commission: {exc.detail or exc.diag}", file=sys.stderr)
        return 2
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    print(report.render_table(result))
    for s in SIDES:
        drive = result["drives"][s]
        if drive["timed_out"]:
            print(f"\npilot {result['names'][s]} timed out after {args.timeout:.0f} s;"
                  f" its last log ends:\n{log_tail(base / s.lower())}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1), encoding="utf-8")
    if args.svg_dir:
        out = Path(args.svg_dir)
        out.mkdir(parents=True, exist_ok=True)
        for suite in result["suites"]:
            (out / f"{suite}.svg").write_text(picture.suite_svg(result, suite), encoding="utf-8")
    if got:
        print(f"pilot commission: stopped by signal {got[0]}", file=sys.stderr)
        return 128 + got[0]
    return 0 if all(r["agree"] for r in result["templates"]) else 1
