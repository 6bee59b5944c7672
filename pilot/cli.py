"""The ``pilot`` command: run, hpc, serve, submit, status, demo, bench.

Each subcommand parses its own options and hands a :class:`PilotConfig`
to the code that does the work, so nothing below this module reads the
command line or branches on environment variables.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pilot import __version__
from pilot.comm.base import LocalUpstream, Upstream
from pilot.config import PilotConfig, queue_settings
from pilot.errors import ErrorCode, PilotError, error_diag
from pilot.fileio import atomic_write_json
from pilot.job import Job, load_job_file
from pilot.monitor.watch import make_monitor
from pilot.workflow import EventServiceRunner, StopSignal, run_job

log = logging.getLogger("pilot.cli")

# Subcommands implemented in their own modules: name -> (module, function, help).
_DELEGATED: dict[str, tuple[str, str, str]] = {
    "hpc": (
        "pilot.cli",
        "hpc_main",
        "MPI mode (Yoda-Droid); 'hpc submit', 'hpc resources' for batch systems; 'hpc journal' shows a journal",
    ),
    "serve": (
        "pilot.server.serve",
        "serve_main",
        "embedded PanDA-compatible dispatcher (HTTP + SQLite)",
    ),
    "submit": (
        "pilot.server.submit",
        "submit_main",
        "load jobs or event-service tasks into the dispatcher",
    ),
    "status": (
        "pilot.server.submit",
        "status_main",
        "jobs and range counts; --flush sends spooled updates",
    ),
    "commission": (
        "pilot.commission.compare",
        "main",
        "a template suite through two pilots at once on queue clones, compared",
    ),
    "demo": (
        "pilot.demo",
        "main",
        "embedded dispatcher + toy event-service task through Yoda and Droids",
    ),
}

# `pilot hpc <word>`: batch-system tools; anything else starts the MPI ranks.
_HPC_TOOLS: dict[str, tuple[str, str]] = {
    "submit": ("hpc.batch", "submit_main"),
    "resources": ("hpc.resources", "main"),
    "journal": ("yoda.journal", "main"),
}


def hpc_main(argv: list[str]) -> int:
    """``pilot hpc``: the only place ``pilot`` imports the MPI side (DESIGN: dependencies point one way)."""
    if argv and argv[0] in _HPC_TOOLS:
        module, func = _HPC_TOOLS[argv[0]]
        return int(getattr(importlib.import_module(module), func)(argv[1:]) or 0)
    return int(importlib.import_module("pilot.ranks").main(argv) or 0)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--workdir",
        default=None,
        help="base directory for job work directories (default: pilot-work; Harvester: the access point)",
    )
    p.add_argument(
        "--site", "--queue", dest="site", default="LOCAL", help="PanDA queue name (siteName)"
    )
    p.add_argument(
        "--input-url",
        default="",
        help="where inputs are read (path or URL; default: next to the job file)",
    )
    p.add_argument(
        "--output-url", default="", help="where outputs are written (default: WORKDIR/storage)"
    )
    p.add_argument(
        "--copytool",
        default=None,
        help="copytool for all transfers: copy, http, rucio; Harvester mode: harvester "
        "(default: the queue's acopytools per activity, else copy)",
    )
    p.add_argument(
        "--queuedata-url", default="", help="queue description (schedconfig JSON): URL or file"
    )
    p.add_argument(
        "--trace-url", default="", help="where transfer traces are sent (Rucio /traces/)"
    )
    p.add_argument("--heartbeat", type=float, default=1800.0, help="heartbeat interval in seconds")
    p.add_argument(
        "--monitor-interval", type=float, default=60.0, help="payload sampling interval in seconds"
    )
    p.add_argument(
        "--kill-grace", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL"
    )
    p.add_argument(
        "--connection-policy",
        default="",
        help="outbound connections of the payload: report (default), deny-all, or allow:HOST/NET[:PORT],...",
    )
    p.add_argument(
        "--es-ready-timeout",
        type=float,
        default=1800.0,
        help="event service: seconds a payload may take to ask for its first range",
    )
    p.add_argument(
        "--es-range-timeout",
        type=float,
        default=None,
        help="event service: seconds a range may stay out before it fails (1375)",
    )
    p.add_argument(
        "--es-final-wait",
        type=float,
        default=1800.0,
        help="event service: seconds to wait for the last reports after No more events",
    )
    p.add_argument(
        "--payload-proxy",
        default="",
        metavar="FILE",
        help="an X.509 proxy meant for payloads (the pilot's own credentials never reach them)",
    )
    p.add_argument("-v", "--verbose", action="store_true")


def _config(args: argparse.Namespace, **overrides: object) -> PilotConfig:
    values = dict(
        workdir=Path(args.workdir or "pilot-work").resolve(),
        site_name=args.site,
        input_url=args.input_url,
        output_url=args.output_url,
        copytool=args.copytool or "",
        heartbeat_interval=args.heartbeat,
        monitor_interval=args.monitor_interval,
        kill_grace=args.kill_grace,
        connection_policy=args.connection_policy,
        trace_url=args.trace_url,
        es_ready_timeout=args.es_ready_timeout,
        es_range_timeout=args.es_range_timeout,
        es_final_wait=args.es_final_wait,
        payload_proxy=args.payload_proxy or None,
    )
    values.update(overrides)
    config = PilotConfig(**values)  # type: ignore[arg-type]
    return _with_rucio(config)


def _with_rucio(config: PilotConfig) -> PilotConfig:
    """Read the Rucio client configuration once, when a copytool of this pilot is rucio.
    Without one the rucio copytool fails each job with its clear error (1342)."""
    from pilot.data.choice import uses_rucio  # noqa: PLC0415

    if config.rucio is not None or not uses_rucio(config):
        return config
    from pilot.data.rucio import RucioSettings  # noqa: PLC0415

    try:
        return dataclasses.replace(config, rucio=RucioSettings.from_environ())
    except PilotError as exc:
        log.warning("rucio copytool: %s", exc.detail)
        return config


# Options of `pilot run` that only one way of getting jobs uses: given with another
# they would be ignored, so they are refused instead.
_MODE_OPTIONS = {
    "url": ("max_jobs", "job_label", "ca_path", "panda_api", "token_file"),
    "harvester": (
        "harvester_map_type",
        "harvester_many_jobs",
        "harvester_heartbeat",
        "harvester_latency",
        "pull",
        "wait",
    ),
    "job_file": (),
}


def _inapplicable(args: argparse.Namespace, defaults: dict[str, object]) -> str | None:
    """Why this combination of options cannot run as asked, or None."""
    modes = [m for m in _MODE_OPTIONS if getattr(args, m, None)]
    if len(modes) > 1:
        names = " and ".join("--" + m.replace("_", "-") for m in modes)
        return f"{names} cannot be combined: give one way of getting jobs"
    for mode, options in _MODE_OPTIONS.items():
        if mode in modes:
            continue
        for option in options:
            if getattr(args, option) != defaults.get(option):
                return f"--{option.replace('_', '-')} applies only with --{mode.replace('_', '-')}"
    return None


def _queue_settings(args: argparse.Namespace, server_url: str | None = None) -> dict[str, Any]:
    """The queue description's part of the config, in every mode (:func:`queue_settings`)."""
    return queue_settings(args.site, queuedata_url=args.queuedata_url, server_url=server_url)


def server_token(token_file: str | None) -> str | None:
    """The bearer token of ``--token-file`` (PilotError when it cannot be read); None without
    the option, and then the client takes PanDA's token variables (``$OIDC_AUTH_TOKEN``)."""
    if not token_file:
        return None
    from pilot.comm.panda import read_token_file  # noqa: PLC0415

    token = read_token_file(token_file)
    if token is None:
        raise PilotError(ErrorCode.NOPROXY, f"no token in --token-file {token_file}")
    return token


def cmd_run(args: argparse.Namespace) -> int:
    problem = _inapplicable(args, getattr(args, "defaults", {}))
    if problem:
        print(f"pilot run: {problem}", file=sys.stderr)
        return 2
    if args.harvester:
        return _run_harvester(args)
    if args.url:
        return _run_pull(args)
    if not args.job_file:
        print("pilot run: one of --job-file, --url or --harvester is required", file=sys.stderr)
        return 2
    job_path = Path(args.job_file)
    input_url = args.input_url or str(job_path.resolve().parent)
    try:
        config = _config(args, input_url=input_url, **_queue_settings(args))
    except PilotError as exc:
        print(f"pilot: {int(exc.code)} {exc.acronym}: {exc.diag}", file=sys.stderr)
        return 1
    try:
        job = load_job_file(job_path)
    except PilotError as exc:
        return _bad_definition(job_path, config, exc)
    with _signals() as stop:
        upstream = LocalUpstream(config.job_workdir(job.panda_id))
        result = run_job(job, config, upstream, stop=stop, monitor_factory=make_monitor)
    _print_result(
        result.state, job.panda_id, result.pilot_error_code, result.pilot_error_diag, result.workdir
    )
    return 0 if result.ok else 1


def _node_resources(workdir: Path) -> dict[str, int]:
    """What getJob tells the server about this node: memory and free disk in MB."""
    import shutil  # noqa: PLC0415

    import psutil  # noqa: PLC0415

    workdir.mkdir(parents=True, exist_ok=True)
    return {
        "mem": psutil.virtual_memory().total // 2**20,
        "diskSpace": shutil.disk_usage(workdir).free // 2**20,
        "cpu": os.cpu_count() or 1,
    }


def _run_pull(args: argparse.Namespace) -> int:
    """Pull mode: getJob until the server has none (or ``--max-jobs``), each job to its final update."""
    from pilot.comm.panda import PandaClient, PandaUpstream, pull_jobs  # noqa: PLC0415
    from pilot.comm.spool import Spool  # noqa: PLC0415
    from pilot.onenode import make_es_runner  # noqa: PLC0415

    try:
        client = PandaClient.from_env(
            args.url,
            ca_path=args.ca_path or None,
            token=server_token(args.token_file),
            api=args.panda_api or "auto",
        )
        queue_settings = _queue_settings(args, server_url=args.url)
    except PilotError as exc:
        print(f"pilot: {int(exc.code)} {exc.acronym}: {exc.diag}", file=sys.stderr)
        return 1
    workdir = Path(args.workdir or "pilot-work").resolve()
    storage = str(workdir / "storage")
    config = _config(
        args,
        workdir=workdir,
        input_url=args.input_url or storage,
        output_url=args.output_url or storage,
        secret_files=(args.token_file,) if args.token_file else (),
        **queue_settings,
    )
    upstream = PandaUpstream(
        client, Spool(workdir / "spool"), site_name=config.site_name, node=config.node
    )
    try:
        sent, left = upstream.flush()
        if sent or left:
            print(f"spool: {sent} earlier updates sent, {left} still pending")
    except PilotError as exc:
        log.warning("spool not flushed: %s", exc)
    counts = {"finished": 0, "failed": 0}
    es_runner = make_es_runner(client)
    params = {"prodSourceLabel": args.job_label, "node": config.node, **_node_resources(workdir)}
    with _signals() as stop:
        try:
            for definition, seconds in pull_jobs(
                client, config.site_name, max_jobs=args.max_jobs or None, **params
            ):
                state = _pull_one(definition, seconds, config, upstream, stop, es_runner)
                counts[state] = counts.get(state, 0) + 1
                if stop.is_set():
                    break
        except PilotError as exc:
            print(f"pilot: {int(exc.code)} {exc.acronym}: {exc.diag}", file=sys.stderr)
            return 1
    print(f"jobs: {counts['finished']} finished, {counts['failed']} failed")
    return 0 if counts["failed"] == 0 else 1


def _pull_one(
    definition: dict[str, Any],
    seconds: float,
    config: PilotConfig,
    upstream: Upstream,
    stop: StopSignal,
    es_runner: EventServiceRunner,
) -> str:
    try:
        job = Job.from_panda(definition)
    except PilotError as exc:
        # A job the pilot cannot even read still gets its final update, so
        # the server does not wait for it until a timeout.
        panda_id = definition.get("PandaID", 0) if isinstance(definition, dict) else 0
        print(f"job {panda_id}: invalid definition: {exc.diag}", file=sys.stderr)
        fields = {
            "state": "failed",
            "pilotErrorCode": int(exc.code),
            "pilotErrorDiag": exc.diag,
            "pilotID": config.pilot_id,
        }
        try:
            upstream.final_update(
                _StubJob(int(str(panda_id)) if str(panda_id).isdigit() else 0), fields
            )
        except PilotError as send_error:
            log.error("final update of invalid job %s failed: %s", panda_id, send_error)
        return "failed"
    result = run_job(
        job,
        config,
        upstream,
        stop=stop,
        monitor_factory=make_monitor,
        es_runner=es_runner,
        getjob_seconds=seconds,
    )
    _print_result(
        result.state, job.panda_id, result.pilot_error_code, result.pilot_error_diag, result.workdir
    )
    return result.state


@dataclasses.dataclass
class _StubJob:
    """Just enough of a Job to address a final update for a definition that did not validate."""

    panda_id: int
    attempt_nr: int = 0


@contextlib.contextmanager
def _signals() -> Iterator[StopSignal]:
    stop = StopSignal()
    restore = stop.install()
    try:
        yield stop
    finally:
        restore()
        stop.close()


def _run_harvester(args: argparse.Namespace) -> int:
    """Push mode (the job spec is there at start) or pull mode (``--pull N``: ask, then wait).

    Every way out leaves Harvester the jobs' attributes and, once all jobs
    are done, the kill file; a job that cannot run (bad spec, or an
    event-service job in a ManyToOne worker, which Harvester does not feed)
    fails with its code in its own attributes while the others run.
    """
    from pilot.comm.harvester import (  # noqa: PLC0415 - only this mode needs it
        HarvesterAccessPoint,
        HarvesterEventSource,
        HarvesterUpstream,
        WorkerHeartbeat,
    )
    from pilot.onenode import make_es_runner  # noqa: PLC0415

    root = Path(args.harvester)
    map_type = "ManyToOne" if args.harvester_many_jobs else args.harvester_map_type
    try:
        ap = HarvesterAccessPoint(root, map_type=map_type)
    except PilotError as exc:
        HarvesterAccessPoint(root, map_type="OneToOne").fail_worker({0: exc}, node=_node())
        print(f"pilot: {int(exc.code)} {exc.acronym}: {exc.diag}", file=sys.stderr)
        return 2
    try:
        queue_settings = _queue_settings(args)
    except PilotError as exc:
        ap.fail_worker({0: exc}, node=_node())
        print(f"pilot: {int(exc.code)} {exc.acronym}: {exc.diag}", file=sys.stderr)
        return 1
    config = _config(
        args,
        workdir=Path(args.workdir or str(ap.root)).resolve(),
        input_url=args.input_url or str(ap.root.resolve()),
        copytool=args.copytool or "harvester",
        **queue_settings,
    )
    running: dict[str, Any] = {"state": "starting"}
    try:
        beat = WorkerHeartbeat(ap, args.harvester_heartbeat, info=lambda: dict(running))
    except PilotError as exc:
        ap.fail_worker({0: exc}, node=config.node)
        print(f"pilot: {int(exc.code)} {exc.acronym}: {exc.diag}", file=sys.stderr)
        return 2
    with beat:
        try:
            found = ap.wait_for_jobs(args.pull, timeout=args.wait) if args.pull else ap.scan_jobs()
        except PilotError as exc:
            ap.fail_worker({0: exc}, node=config.node)
            print(
                f"pilot: no valid job in {ap.root}: {int(exc.code)} {exc.acronym}: {exc.diag}",
                file=sys.stderr,
            )
            return 1
        runnable = found.runnable(ap.many_jobs)
        failed_to_start, jobs = runnable.failed, runnable.jobs
        for pid, exc in failed_to_start.items():
            print(
                f"job {pid or '?'}: failed before start: {int(exc.code)} {exc.acronym}: {exc.diag}",
                file=sys.stderr,
            )
        if failed_to_start:
            ap.fail_worker(failed_to_start, node=config.node, kill=not jobs)
        if not jobs:
            return 1
        source = HarvesterEventSource(ap, latency=args.harvester_latency)
        upstream = HarvesterUpstream(ap, finish_worker=False)
        failed = len(failed_to_start)
        with _signals() as stop:
            for job in jobs:
                if stop.is_set():
                    break
                running.update(state="running", PandaID=job.panda_id)
                job_config = config
                if ap.many_jobs:
                    job_dir = ap.job_dir(job.panda_id).resolve()
                    job_config = dataclasses.replace(
                        config,
                        workdir=job_dir if not args.workdir else config.workdir,
                        input_url=args.input_url or str(job_dir),
                    )
                result = run_job(
                    job,
                    job_config,
                    upstream,
                    stop=stop,
                    monitor_factory=make_monitor,
                    es_runner=make_es_runner(source),
                )
                failed += not result.ok
                _print_result(
                    result.state,
                    job.panda_id,
                    result.pilot_error_code,
                    result.pilot_error_diag,
                    result.workdir,
                )
        running.update(state="done")
        ap.request_kill(f"{len(jobs) + len(failed_to_start)} jobs done, {failed} failed")
    return 0 if failed == 0 else 1


def _node() -> str:
    import socket  # noqa: PLC0415

    return socket.gethostname()


def _bad_definition(job_path: Path, config: PilotConfig, exc: PilotError) -> int:
    """A job file that does not validate still gets a failed final-update record."""
    panda_id = 0
    try:
        raw = json.loads(job_path.read_text(encoding="utf-8"))
        if isinstance(raw, dict):
            panda_id = int(raw.get("PandaID", 0))
    except (OSError, ValueError, TypeError):
        pass
    record = {
        "jobId": panda_id,
        "state": "failed",
        "pilotErrorCode": int(exc.code),
        "pilotErrorDiag": error_diag(exc.code, exc.detail),
        "siteName": config.site_name,
        "node": config.node,
    }
    target = config.workdir / (f"PandaJob_{panda_id}" if panda_id else "invalid_job")
    try:
        atomic_write_json(target / "final_update.json", record, indent=1)
    except OSError:
        pass
    print(
        f"pilot: invalid job definition {job_path}: {int(exc.code)} {exc.acronym}: {exc.diag}",
        file=sys.stderr,
    )
    return 1


def _print_result(state: str, panda_id: int, code: int, diag: str, workdir: Path) -> None:
    line = f"job {panda_id}: {state}"
    if code:
        line += f" (pilotErrorCode {code}: {diag})"
    print(line)
    print(f"work directory: {workdir}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pilot", description="PanDA pilot for the grid and HPC")
    parser.add_argument("--version", action="version", version=f"pilot {__version__}")
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="run jobs on this node")
    _add_common(run)
    run.add_argument("--job-file", help="a PanDA job definition (JSON) to run")
    run.add_argument("--url", help="PanDA server URL (pull mode), e.g. https://panda:25443")
    run.add_argument(
        "--max-jobs", type=int, default=0, help="pull mode: stop after N jobs (0: until none)"
    )
    run.add_argument("--job-label", default="managed", help="prodSourceLabel asked for in getJob")
    run.add_argument("--ca-path", default="", help="CA certificates directory or bundle for HTTPS")
    run.add_argument(
        "--panda-api",
        choices=("v1", "legacy", "auto"),
        default=None,
        help="PanDA server API: v1 (/api/v1, panda-server >= 1.0), legacy (/server/panda),"
        " auto (default: v1, and legacy for the run if the server forbids v1)",
    )
    run.add_argument(
        "--token-file",
        default=None,
        help="file holding the bearer token for the server (default: $OIDC_AUTH_TOKEN in"
        " $OIDC_AUTH_DIR, as PanDA pilots take it); `pilot serve` writes DB.token",
    )
    run.add_argument("--harvester", metavar="DIR", help="Harvester access point (shared-file mode)")
    run.add_argument(
        "--harvester-map-type",
        default="auto",
        help="Harvester map type: OneToOne, ManyToOne, or auto (from where the job spec is)",
    )
    run.add_argument(
        "--harvester-many-jobs",
        action="store_true",
        help="same as --harvester-map-type ManyToOne",
    )
    run.add_argument(
        "--harvester-heartbeat",
        type=float,
        default=20.0,
        metavar="S",
        help="how often worker_heartbeat.json is refreshed (default 20 s)",
    )
    run.add_argument(
        "--harvester-latency",
        type=float,
        default=600.0,
        metavar="S",
        help="how long Harvester takes to answer a request for event ranges (sizes requests)",
    )
    run.add_argument(
        "--pull", type=int, default=0, metavar="N", help="Harvester pull mode: request N jobs"
    )
    run.add_argument(
        "--wait", type=float, default=600.0, help="seconds to wait for Harvester's job file"
    )
    run.set_defaults(func=cmd_run)
    run.set_defaults(
        defaults={o: run.get_default(o) for opts in _MODE_OPTIONS.values() for o in opts}
    )
    for name, (_module, _func, help_text) in _DELEGATED.items():
        p = sub.add_parser(name, help=help_text, add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _DELEGATED:
        module, func, _ = _DELEGATED[argv[0]]
        return int(getattr(importlib.import_module(module), func)(argv[1:]) or 0)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    level = logging.DEBUG if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.setLevel(level)  # the job's own log file still gets INFO
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
