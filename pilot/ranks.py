"""``mpiexec -n N pilot hpc ...``: each rank picks its role, rank 0 Yoda, the others Droids.

This is the top of the layering (docs/DESIGN.md, "What each package may import"):
it parses the options and hands each rank to its role, :func:`yoda.rank.run_yoda`
on rank 0 and :func:`droid.rank.run_droid` elsewhere, or to
:mod:`pilot.wholejobs` for ordinary jobs; ``hpc`` underneath knows neither.

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
    or a OneToOne worker's) run whole, one per rank (:mod:`pilot.wholejobs`).
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
import faulthandler
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from droid.rank import run_droid
from hpc.payloadconfig import add_options as add_payload_options
from hpc.payloadconfig import output_storage
from hpc.transport import Envelope, Kind, MPITransport
from hpc.tuning import tune_gc
from pilot import wholejobs
from pilot.data.copytools import make_copytool
from pilot.errors import ErrorCode, PilotError
from yoda.rank import run_yoda

log = logging.getLogger("hpc")


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
    add_payload_options(p)
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
