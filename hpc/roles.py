"""``mpiexec -n N pilot hpc ...``: rank 0 becomes Yoda, every other rank a Droid.

Options mean what they mean for ``pilot run`` where both have them
(``--url``/``--queue``, ``--harvester``, ``--workdir``). The MPI-specific ones:

``--resume``
    Rebuild the ledger from ``<workdir>/yoda.journal`` (rank 0 was killed, or
    the allocation ended): ranges already reported are not run again, results
    not yet acknowledged upstream are sent, old leases go back to READY.
``--walltime-end EPOCH``
    When the allocation ends (the batch script passes the batch system's
    value); Yoda drains ``--drain-lead`` seconds before it.
``--jobs N``
    How many jobs rank 0 pulls from a PanDA server for the allocation.
``--copytool NAME``, ``--output-url URL``
    Where a droid stores each finished range's output before its result goes
    to Yoda, as ``pilot run`` does (default with ``--url``: ``copy`` into
    ``WORKDIR/storage``). A range whose output cannot be stored fails with the
    stage-out's error code (PanDA hands failed ranges to a later job). With
    ``--harvester`` outputs stay where they are: Harvester stages them out.

``--harvester AP`` (with ``--harvester-map-type``, default: from where the job
spec is)
    A OneToOne worker's event-service job runs through Yoda, its requests and
    ranges at the top of the access point; ordinary jobs (a ManyToOne worker's,
    or a OneToOne worker's) run whole, one per rank (:mod:`hpc.wholejobs`).
    Rank 0 refreshes ``worker_heartbeat.json`` every ``--harvester-heartbeat``
    seconds and leaves every job final, then ``kill_worker.json``.

Layout under the work directory: ``yoda.journal``, ``logs/rank<N>.log``,
``droid<N>/<PandaID>/`` (payload work directories) with the outputs renamed
into ``droid<N>/<PandaID>/outputs/`` when complete.

Signals: SIGTERM (or SIGUSR1, which some batch systems send before the end)
makes Yoda drain and a Droid stop taking ranges; both then exit through
MPI_Finalize. MPI is never aborted on the normal path.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import json
import logging
import os
import signal
import sys
import tarfile
import threading
import time
import uuid
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from droid.droid import Droid, DroidOptions
from droid.executors import event_executor
from droid.nullexec import NullExecutor
from hpc import wholejobs
from hpc.transport import Envelope, Kind, MPITransport
from hpc.tuning import tune_gc
from pilot.data.copytools import make_copytool
from pilot.errors import ErrorCode, PilotError
from yoda.journal import Book, Journal, resume_book
from yoda.ledger import Ledger
from yoda.link import InlineLink, Link, ProcessLink, recover_fetched
from yoda.master import Yoda, YodaOptions
from yoda.scheduler import Policy, Scheduler

log = logging.getLogger("hpc")
JOURNAL = "yoda.journal"
FETCHED = "yoda.fetched"  # ranges the upstream link read, written before rank 0 is told


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pilot hpc", description="Yoda (rank 0) and Droids (other ranks) under mpiexec"
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--url", help="PanDA server (or the embedded dispatcher)")
    src.add_argument("--harvester", metavar="DIR", help="Harvester access point")
    p.add_argument("--queue", help="PanDA queue (site) name, with --url")
    p.add_argument(
        "--harvester-map-type",
        default="auto",
        help="with --harvester: OneToOne, ManyToOne, or auto (from where the job spec is)",
    )
    p.add_argument(
        "--harvester-heartbeat",
        type=float,
        default=20.0,
        metavar="S",
        help="with --harvester: how often rank 0 refreshes worker_heartbeat.json",
    )
    p.add_argument(
        "--harvester-latency",
        type=float,
        default=600.0,
        metavar="S",
        help="with --harvester: how long Harvester takes to answer (sizes range requests)",
    )
    p.add_argument("--workdir", default=".", help="shared work directory (default: .)")
    p.add_argument("--resume", action="store_true", help="rebuild the ledger from the journal")
    p.add_argument("--walltime-end", type=float, default=None, metavar="EPOCH")
    p.add_argument("--drain-lead", type=float, default=300.0, metavar="S")
    p.add_argument("--jobs", type=int, default=1, help="jobs to pull with --url (default 1)")
    p.add_argument(
        "--output-url",
        default="",
        help="where each finished range's output is stored (default: WORKDIR/storage)",
    )
    p.add_argument(
        "--copytool",
        default="",
        help="copytool for the outputs: copy (default), http, rucio; Harvester mode: harvester",
    )
    p.add_argument("--slots", type=int, default=1, help="payload slots per droid")
    p.add_argument("--lease", type=float, default=600.0, metavar="S", help="range lease")
    p.add_argument("--hb-interval", type=float, default=10.0, metavar="S")
    p.add_argument("--hb-timeout", type=float, default=120.0, metavar="S")
    p.add_argument(
        "--term-grace",
        type=float,
        default=60.0,
        metavar="S",
        help="after SIGTERM, how long running ranges may take before they are given back",
    )
    p.add_argument("--retry-max", type=float, default=30.0, metavar="S", help=argparse.SUPPRESS)
    p.add_argument("--token", default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "--token-file",
        default=None,
        help="bearer token for --url (default: $OIDC_AUTH_TOKEN in $OIDC_AUTH_DIR)",
    )
    p.add_argument(
        "--panda-api",
        choices=("v1", "legacy", "auto"),
        default="auto",
        help="PanDA server API with --url (default auto: v1, legacy if the server forbids v1)",
    )
    p.add_argument(
        "--executor",
        choices=("es", "null"),
        default="es",
        help="es: the job's event-service payload; null: finish ranges at once (benchmarks)",
    )
    p.add_argument("--log-level", default="INFO")
    return p


def _setup_logging(workdir: Path, rank: int, level: str) -> None:
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(workdir / "logs" / f"rank{rank}.log")
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s")
    )
    err = logging.StreamHandler(sys.stderr)
    err.setLevel(logging.WARNING)
    err.setFormatter(logging.Formatter(f"rank{rank} %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler, err]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))


def range_source(
    url: str = "",
    token: str | None = None,
    harvester: str = "",
    api: str = "auto",
    map_type: str = "auto",
    latency: float = 600.0,
) -> Any:
    """What hands out ranges and takes their results: the PanDA client for ``--url``, the
    Harvester files for ``--harvester``. Built in rank 0 and again in its upstream link.

    Harvester answers in minutes: the source waits a moment for an answer, then says
    "not yet" as an error, which rank 0 retries with backoff."""
    if url:
        from pilot.comm.panda import PandaClient, token_from_env

        token = token or token_from_env()
        return PandaClient(url, token=token, retries=2, timeout=(5.0, 30.0), api=api)
    from pilot.comm.harvester import HarvesterAccessPoint, HarvesterEventSource

    return HarvesterEventSource(
        HarvesterAccessPoint(harvester, map_type=map_type),
        block=2.0,
        latency=latency,
        pending_is_error=True,
    )


def hpc_token(args: argparse.Namespace) -> str | None:
    """``--token``, else the file ``--token-file`` names (PilotError when unreadable)."""
    if args.token or not getattr(args, "token_file", None):
        return args.token
    from pilot.comm.panda import read_token_file

    token = read_token_file(args.token_file)
    if token is None:
        raise PilotError(ErrorCode.NOPROXY, f"no token in --token-file {args.token_file}")
    return token


def make_link(args: argparse.Namespace, upstream: Any) -> Link:
    """The upstream in a process of its own (see :mod:`yoda.link`); in this one if that fails."""
    spec = {
        "factory": "hpc.roles:range_source",
        "kwargs": {
            "url": args.url or "",
            "token": hpc_token(args),
            "harvester": args.harvester or "",
            "api": args.panda_api,
            "map_type": args.harvester_map_type,
            "latency": args.harvester_latency,
        },
        "log": str(Path(args.workdir) / "logs" / "link.log"),
        "fetched": str(Path(args.workdir) / FETCHED),
    }
    try:
        return ProcessLink(spec)
    except (PilotError, OSError) as exc:
        log.warning("upstream link process failed (%s): calling the upstream from rank 0", exc)
        return InlineLink(upstream)


def make_upstream(args: argparse.Namespace) -> tuple[Any, Any]:
    """(range source, job getter) for ``--url`` or ``--harvester``."""
    if args.url:
        if not args.queue:
            raise PilotError(ErrorCode.NOTDEFINED, "--url needs --queue")
        client = range_source(url=args.url, token=hpc_token(args), api=args.panda_api)

        def jobs() -> list[dict[str, Any]]:
            out = []
            for _ in range(max(1, args.jobs)):
                job = client.get_job(args.queue, prodSourceLabel="managed")
                if job is None:
                    break
                out.append(job)
            return out

        return client, jobs
    source = range_source(
        harvester=args.harvester,
        map_type=args.harvester_map_type,
        latency=args.harvester_latency,
    )

    def harvester_jobs() -> list[dict[str, Any]]:
        return harvester_worker_jobs(source.ap)

    return source, harvester_jobs


def harvester_worker_jobs(ap: Any) -> list[dict[str, Any]]:
    """The event-service jobs rank 0 runs from the access point.

    Jobs that cannot run here fail at once with their codes in their own
    attributes: invalid specs; event-service jobs of a ManyToOne worker, which
    Harvester never feeds ranges. (Ordinary jobs go to :mod:`hpc.wholejobs`.)
    """
    found = ap.scan_jobs()
    failed = dict(found.failed)
    jobs = []
    for job in found.jobs:
        if job.event_service and ap.many_jobs:
            failed[job.panda_id] = PilotError(
                ErrorCode.BADQUEUECONFIGURATION,
                "event-service job in a ManyToOne worker: Harvester feeds event ranges "
                "only to OneToOne workers",
            )
        else:
            jobs.append(job.raw)
    for pid, exc in failed.items():
        log.error("job %s cannot run: %s", pid or "?", exc)
    if failed:
        import socket

        ap.fail_worker(failed, node=socket.gethostname(), kill=not jobs)
    return jobs


def harvester_job_update(access_point: Any, context: Any = None) -> Any:
    """Job states for Harvester: ``worker_attributes.json`` (at the top of a OneToOne
    worker's access point) and, at the end, what ``pilot run`` leaves there.

    Harvester reads a job's state from its worker attributes; rank 0 writes
    them as the PanDA client would send updateJob, and Harvester reports
    them to PanDA itself. A final state comes with the fields of ``pilot
    run``'s final update (node, site, start and end times in PanDA's
    format, cores, CPU of the droids' payloads), the job report, and the
    log tarball of the ranks' logs in the stage-out dump.
    """
    from pilot.comm.harvester import HarvesterUpstream

    upstream = HarvesterUpstream(access_point, finish_worker=False)

    def update(fields: dict[str, Any]) -> None:
        job = SimpleNamespace(panda_id=int(fields["jobId"]))
        if fields.get("state") in ("finished", "failed") and context is not None:
            final_job, full = context.final(dict(fields))
            if upstream.final_update(final_job, full):
                return
            raise PilotError(ErrorCode.FILEHANDLINGFAILURE, "final attributes not written")
        upstream.heartbeat(job, fields)  # type: ignore[arg-type]

    return update


class FinalReport:
    """What rank 0 knows of an event-service job at its end, as ``pilot run`` reports it."""

    def __init__(self, args: argparse.Namespace, jobs: dict[int, dict[str, Any]]) -> None:
        import socket

        self.args = args
        self.jobs = jobs
        self.start = time.time()
        self.node = socket.gethostname()
        self.pilot_id = f"{self.node}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.yoda: Yoda | None = None

    def _cpu(self) -> float:
        if self.yoda is None:
            return 0.0
        return float(sum(d.cpu for d in self.yoda.s.droids.values()))

    def final(self, fields: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        from pilot.job import Job

        panda_id = int(fields["jobId"])
        raw = self.jobs.get(panda_id, {"PandaID": panda_id, "transformation": "?"})
        try:
            job = Job.from_panda(raw)
        except PilotError:
            job = SimpleNamespace(panda_id=panda_id, all_outputs=[], log_file=None)
        end = time.time()
        ranks = (self.yoda.t.size - 1) if self.yoda is not None else 0
        full = {
            "siteName": self.args.queue or "LOCAL",
            "node": self.node,
            "pilotID": self.pilot_id,
            "startTime": round(self.start, 3),
            "endTime": round(end, 3),
            "coreCount": max(1, ranks * max(1, self.args.slots)),
            "cpuConsumptionTime": int(round(self._cpu())),
            "cpuConsumptionUnit": "s",
            "cpuConversionFactor": 1.0,
            "pilotErrorCode": 0,
            "pilotErrorDiag": "",
            "exeErrorCode": 0,
            "exeErrorDiag": "",
            "transExitCode": 0,
            **fields,
        }
        if str(full.get("attemptNr", "")).isdigit():
            full["attemptNr"] = int(full["attemptNr"])
        report = {
            "PandaID": panda_id,
            "state": full["state"],
            "pilotErrorCode": full["pilotErrorCode"],
            "pilotErrorDiag": full["pilotErrorDiag"],
            "startTime": self.start,
            "endTime": end,
            "nEvents": full.get("nEvents", 0),
            "ranks": ranks,
            "reported": self.yoda.reported if self.yoda is not None else 0,
        }
        full["metaData"] = json.dumps(report)
        log_spec = getattr(job, "log_file", None)
        if log_spec is not None:
            try:
                self._log_tarball(log_spec)
            except (OSError, tarfile.TarError) as exc:
                log.error("log tarball not made: %s", exc)
                log_spec.local_path = ""
        return job, full

    def _log_tarball(self, spec: Any) -> None:
        """The ranks' logs and each payload's own logs, without the range outputs."""
        from pilot.data.checksum import adler32_file

        work = Path(self.args.workdir)
        path = work / spec.lfn
        top = spec.lfn.removesuffix(".tgz").removesuffix(".tar.gz") or "log"
        with tarfile.open(path, "w:gz") as tar:
            for item in sorted(work.rglob("*")):
                rel = item.relative_to(work)
                if not item.is_file() or item.is_symlink() or item == path:
                    continue
                if "outputs" in rel.parts or item.suffix not in (".log", ".txt", ".json"):
                    continue
                if item.stat().st_size > 50 * 2**20:
                    continue
                tar.add(item, arcname=f"{top}/{rel}")
        spec.local_path = str(path)
        spec.fsize = path.stat().st_size
        spec.checksum = f"ad:{adler32_file(path)}"
        spec.guid = spec.guid or str(uuid.uuid4())


def run_yoda(args: argparse.Namespace, transport: MPITransport) -> int:
    workdir = Path(args.workdir)
    upstream, get_jobs = make_upstream(args)
    path = workdir / JOURNAL
    if args.resume and path.exists():
        book, epoch = resume_book(path, group=True)  # Yoda commits before it sends
        log.info("resumed from %s: epoch %d, %d ranges", path, epoch, book.ledger.n)
        recovered = recover_fetched(book, workdir / FETCHED)
        if recovered:
            log.warning("%d ranges fetched before the crash but never journaled: added", recovered)
    else:
        if path.exists():
            raise PilotError(
                ErrorCode.FILEEXISTS, f"{path} exists: use --resume, or another --workdir"
            )
        book, epoch = Book(Ledger(t0=time.time()), Journal(path, group=True)), 1
        book.epoch(epoch)
        (workdir / FETCHED).unlink(missing_ok=True)
    if not book.jobs:
        for job in get_jobs():
            book.add_job(job)
        if not book.jobs:
            log.error("no job from the upstream")
    policy = Policy(
        lease_s=args.lease,
        hb_interval=args.hb_interval,
        hb_timeout=args.hb_timeout,
        walltime_end=args.walltime_end,
        drain_lead=args.drain_lead,
        term_grace=args.term_grace,
        # the droid's own lease check (the executor's range timeout) must win the race
        lease_grace=2 * args.hb_interval + 5,
    )
    options = YodaOptions(retry_max=args.retry_max)
    # updateJob with --url; worker attributes for Harvester with --harvester
    report = FinalReport(args, {int(j.get("PandaID", 0) or 0): j for j in book.jobs})
    job_update = getattr(upstream, "update_job", None) or harvester_job_update(upstream.ap, report)
    yoda = Yoda(
        transport,
        upstream,
        Scheduler(book, policy, epoch=epoch),
        options,
        job_update=job_update,
        link=make_link(args, upstream),
    )
    report.yoda = yoda
    if not book.jobs:
        yoda.s.exhausted = True
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda signum, frame: yoda.request_drain())
    try:
        with _heartbeat(args, upstream, yoda):
            rc = yoda.run()
            if args.harvester and rc == 0:
                # Every result is with Harvester and this worker ends (drained or
                # done): a job not yet final gets its final state now, or Harvester
                # would see it running in a worker that is gone.
                yoda.report_jobs(final=True, worker_end=True)
    finally:
        if book.journal is not None:
            book.journal.close()
    if args.harvester and rc == 0:
        # the worker is done (Harvester's kill_worker.json)
        upstream.ap.request_kill("all ranges reported")
    return rc


def _heartbeat(args: argparse.Namespace, upstream: Any, yoda: Yoda) -> Any:
    """With ``--harvester``: rank 0 keeps ``worker_heartbeat.json`` fresh while ranges run
    (Harvester kills a worker whose heartbeat is too old)."""
    if not args.harvester:
        return contextlib.nullcontext()
    from pilot.comm.harvester import WorkerHeartbeat

    return WorkerHeartbeat(
        upstream.ap,
        args.harvester_heartbeat,
        info=lambda: {"ranks": yoda.t.size, "reported": yoda.reported},
    )


def output_storage(args: argparse.Namespace) -> SimpleNamespace:
    """Where the droids store finished ranges' outputs, with ``pilot run``'s defaults:
    the ``copy`` copytool into ``WORKDIR/storage`` with ``--url``; with ``--harvester``
    the outputs stay where they are and Harvester stages them out."""
    return SimpleNamespace(
        copytool=args.copytool or ("harvester" if args.harvester else "copy"),
        copytool_options={},
        output_url=args.output_url,
        workdir=str(Path(args.workdir).resolve()),
        stageout_timeout=3600.0,
    )


def run_droid(args: argparse.Namespace, transport: MPITransport) -> int:
    workdir = Path(args.workdir) / f"droid{transport.rank}"
    if args.executor == "null":

        def factory(job, wd, slots, lease_s):
            return NullExecutor(job, wd, slots, write_outputs=True)

    else:
        factory = partial(event_executor, storage=output_storage(args))
    droid = Droid(transport, workdir, factory, DroidOptions(slots=max(1, args.slots)))

    # The batch system signals every rank; Yoda's DRAIN follows. Until then the
    # droid takes nothing new and finishes what runs.
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda signum, frame: droid.request_drain())
    rc = droid.run()
    if droid.yoda_dead:
        # Not the normal path: with rank 0 gone, MPI_Finalize may wait for it forever.
        # The payloads are stopped and the results are Yoda's journal's business now.
        log.error("leaving without MPI_Finalize: rank 0 is dead")
        logging.shutdown()
        os._exit(3)
    return rc


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    workdir = Path(args.workdir).resolve()
    args.workdir = str(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    transport = MPITransport()
    _setup_logging(workdir, transport.rank, args.log_level)
    stacks = open(workdir / "logs" / f"rank{transport.rank}.stacks", "w")  # noqa: SIM115
    faulthandler.register(signal.SIGUSR2, file=stacks, all_threads=True)
    tune_gc()
    if transport.size < 2:
        log.error("pilot hpc needs at least 2 ranks (Yoda and one Droid)")
        harvester_failed(
            args, PilotError(ErrorCode.RESOURCEUNAVAILABLE, "pilot hpc started with one rank")
        )
        return 2
    try:
        make_copytool(output_storage(args).copytool)  # a wrong name stops every rank at once
        if wholejobs.is_whole_jobs(args):  # ordinary jobs, whole, one per rank
            run = wholejobs.run_rank0 if transport.rank == 0 else wholejobs.run_rank
            rc = run(args, transport)
        elif transport.rank == 0:
            rc = run_yoda(args, transport)
        else:
            rc = run_droid(args, transport)
    except PilotError as exc:
        log.error("%s", exc)
        rc = 1
        if transport.rank == 0:  # do not leave the droids waiting for a CONFIG
            harvester_failed(args, exc)
            for rank in range(1, transport.size):
                transport.send(rank, Envelope(Kind.STOP, body={"reason": exc.diag}))
    finally:
        transport.close()
    finalize(rc)
    logging.shutdown()
    return rc


def harvester_failed(args: argparse.Namespace, exc: PilotError) -> None:
    """With ``--harvester``, an error that stops the worker still leaves Harvester the
    jobs' failed attributes and the kill file (the access point's own layout when the
    map type is readable, else the top of the access point)."""
    if not args.harvester:
        return
    import socket

    from pilot.comm.harvester import HarvesterAccessPoint

    try:
        ap = HarvesterAccessPoint(args.harvester, map_type=args.harvester_map_type)
    except PilotError:
        ap = HarvesterAccessPoint(args.harvester, map_type="OneToOne")
    try:
        if ap.kill_requested():
            return  # the jobs' states are written already
        ap.fail_worker({0: exc}, node=socket.gethostname())
    except OSError as write_error:
        log.error("cannot tell Harvester: %s", write_error)


def finalize(rc: int, timeout: float = 20.0) -> None:
    """MPI_Finalize, bounded: after a rank died, Open MPI may wait in it for the dead
    peer (seen now and then under ULFM); the work is done and journaled by then, so
    the process leaves with ``rc`` instead of holding the allocation."""
    from mpi4py import MPI

    if MPI.Is_finalized():
        return

    def give_up() -> None:
        log.error("MPI_Finalize did not return in %.0f s (a dead peer?): leaving", timeout)
        logging.shutdown()
        os._exit(rc)

    watchdog = threading.Timer(timeout, give_up)
    watchdog.daemon = True
    watchdog.start()
    # The timer needs the GIL, which a hung MPI_Finalize may hold; faulthandler's own
    # C thread does not: it prints the stacks and leaves (exit 1) a little later.
    faulthandler.dump_traceback_later(timeout + 5, exit=True)
    MPI.Finalize()
    faulthandler.cancel_dump_traceback_later()
    watchdog.cancel()


if __name__ == "__main__":
    sys.exit(main())
