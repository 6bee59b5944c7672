"""``pilot hpc --harvester AP`` with ordinary jobs: whole jobs, one per rank at a time.

A rank role beside :func:`pilot.workflow.run_job`, whose job life it runs on each
rank; :mod:`pilot.ranks` picks it. (Not in ``hpc``, which holds only what the roles
share: transport, wire, batch systems, resources.)

Harvester feeds a ManyToOne worker several ordinary jobs, each job's spec in
``AP/<PandaID>/``, and never feeds it event ranges. So there is nothing for
Yoda to split: rank 0 hands out whole jobs, one at a time, to the ranks that
ask, and each rank runs the single-node job life of ``pilot run``
(:func:`pilot.workflow.run_job`: stage-in, payload under the monitor,
stage-out, final update) in ``AP/<PandaID>/``, writing that job's attributes,
job report and stage-out dump there itself (the access point is on a shared
file system). Rank 0 keeps the worker's heartbeat fresh, gives a job whose
rank died or that never started its failed attributes, and writes the kill
file once every job has its final state.

Messages (the kinds of :class:`hpc.transport.Kind`): a rank sends WORK_REQ;
rank 0 answers WORK with ``{"job": definition}`` or ``{"no_more": True}``; the
rank sends UPDATE ``{"PandaID", "state", "code"}`` after each job and BYE
when told there is no more; rank 0 ends with STOP. SIGTERM (or SIGUSR1) makes
rank 0 hand out nothing more, and each rank's running job stop with the
signal's code, as ``pilot run`` does.
"""

from __future__ import annotations

import logging
import signal
import socket
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from hpc.payloadconfig import payload_config
from hpc.transport import Envelope, Kind, PeerFailed
from pilot.comm.harvester import HarvesterAccessPoint, HarvesterUpstream, WorkerHeartbeat
from pilot.config import PilotConfig
from pilot.errors import ErrorCode, PilotError, signal_code
from pilot.job import Job
from pilot.monitor.watch import make_monitor
from pilot.workflow import StopSignal, run_job

log = logging.getLogger("pilot.wholejobs")

DEATH_CODE = ErrorCode.INTERNALPILOTPROBLEM


def runnable_jobs(ap: HarvesterAccessPoint) -> tuple[list[Job], dict[int, PilotError]]:
    """The ordinary jobs of the worker, and the error of each job that cannot run."""
    found = ap.scan_jobs().runnable(ap.many_jobs)
    return found.jobs, found.failed


@dataclass
class Farm:
    """Rank 0's book of whole jobs: what waits, who runs what, what ended."""

    waiting: list[Job]
    ranks: set[int]
    running: dict[int, Job] = field(default_factory=dict)  # rank -> job
    ended: dict[int, str] = field(default_factory=dict)  # PandaID -> state
    gone: set[int] = field(default_factory=set)  # ranks that said BYE or died
    draining: bool = False
    signum: int | None = None

    def on_request(self, rank: int) -> dict[str, Any]:
        if self.draining or not self.waiting:
            return {"no_more": True}
        job = self.waiting.pop(0)
        self.running[rank] = job
        return {"job": job.raw}

    def on_update(self, rank: int, body: dict[str, Any]) -> None:
        job = self.running.pop(rank, None)
        pid = int(body.get("PandaID", job.panda_id if job else 0))
        self.ended[pid] = str(body.get("state", "failed"))

    def on_dead(self, rank: int) -> Job | None:
        self.gone.add(rank)
        return self.running.pop(rank, None)

    def done(self) -> bool:
        return self.ranks <= self.gone


def run_rank0(args: Any, transport: Any) -> int:
    ap = HarvesterAccessPoint(args.harvester, map_type=args.harvester_map_type)
    node = socket.gethostname()
    jobs, failed = runnable_jobs(ap)
    for pid, exc in failed.items():
        log.error("job %s cannot run: %s", pid or "?", exc)
    if failed:
        ap.fail_worker(failed, node=node, kill=False)
    farm = Farm(jobs, set(range(1, transport.size)))

    def drain(signum: int, _frame: object) -> None:
        farm.draining = True
        farm.signum = signum

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, drain)
    log.info("%d jobs for %d ranks", len(jobs), transport.size - 1)

    def info() -> dict[str, int]:
        return {"jobs": len(jobs), "ended": len(farm.ended), "running": len(farm.running)}

    with WorkerHeartbeat(ap, args.harvester_heartbeat, info=info):
        for _ in range(10_000_000):  # bounded; each turn waits for a message
            if farm.done():
                break
            got = transport.recv(timeout=1.0)
            if got is None:
                continue
            if isinstance(got, PeerFailed):
                lost = farm.on_dead(got.rank)
                if lost is not None:
                    exc = PilotError(DEATH_CODE, f"rank {got.rank} died running the job")
                    ap.fail_worker({lost.panda_id: exc}, node=node, kill=False)
                    farm.ended[lost.panda_id] = "failed"
                continue
            if got.kind is Kind.WORK_REQ:
                transport.send(got.source, Envelope(Kind.WORK, body=farm.on_request(got.source)))
            elif got.kind is Kind.UPDATE and isinstance(got.body, dict):
                farm.on_update(got.source, got.body)
                log.info(
                    "job %s: %s (rank %d)",
                    got.body.get("PandaID"),
                    got.body.get("state"),
                    got.source,
                )
            elif got.kind is Kind.BYE:
                farm.gone.add(got.source)
        if farm.waiting:  # drained before they started: PanDA can give them to another worker
            code = signal_code(farm.signum or signal.SIGTERM)
            exc = PilotError(code, "not started: the worker was stopped")
            ap.fail_worker({job.panda_id: exc for job in farm.waiting}, node=node, kill=False)
            for job in farm.waiting:
                farm.ended[job.panda_id] = "failed"
        for rank in range(1, transport.size):
            transport.send(rank, Envelope(Kind.STOP))
        if hasattr(transport, "flush"):
            transport.flush(5.0)
        n_failed = sum(s != "finished" for s in farm.ended.values()) + len(failed)
        ap.request_kill(f"{len(farm.ended) + len(failed)} jobs done, {n_failed} failed")
    return 0 if n_failed == 0 else 1


def job_config(
    args: Any, ap: HarvesterAccessPoint, job: Job, base: PilotConfig | None = None
) -> PilotConfig:
    """``pilot run --harvester``'s configuration, in the job's own directory, with the
    payload's guard rails as every rank's (``base``, from
    :func:`hpc.payloadconfig.payload_config`, read once per rank)."""
    job_dir = ap.job_dir(job.panda_id).resolve()
    return replace(
        base if base is not None else payload_config(args),
        workdir=job_dir,
        input_url=str(job_dir),
        copytool=args.copytool or "harvester",
        output_url=args.output_url,
    )


def run_rank(args: Any, transport: Any) -> int:
    ap = HarvesterAccessPoint(args.harvester, map_type=args.harvester_map_type)
    upstream = HarvesterUpstream(ap, finish_worker=False)
    base = payload_config(args)  # the queue's description is read once per rank
    stop = StopSignal()
    restore = stop.install((signal.SIGTERM, signal.SIGUSR1, signal.SIGINT))
    ran = 0
    try:
        transport.send(0, Envelope(Kind.WORK_REQ))
        for _ in range(10_000_000):  # bounded; each turn waits for rank 0
            got = transport.recv(timeout=5.0)
            if got is None:
                continue
            if isinstance(got, PeerFailed):
                if got.rank == 0:
                    log.error("rank 0 died: leaving")
                    return 3
                continue
            if got.kind is Kind.STOP:
                break
            if got.kind is not Kind.WORK or not isinstance(got.body, dict):
                continue
            if got.body.get("no_more") or "job" not in got.body:
                transport.send(0, Envelope(Kind.BYE))
                continue
            state, code = run_one(got.body["job"], args, ap, upstream, stop, base)
            ran += 1
            transport.send(
                0, Envelope(Kind.UPDATE, body={"state": state, "code": code, **_pid(got.body)})
            )
            if stop.is_set():
                transport.send(0, Envelope(Kind.BYE))
            else:
                transport.send(0, Envelope(Kind.WORK_REQ))
    finally:
        restore()
        stop.close()
    log.info("rank %d ran %d jobs", transport.rank, ran)
    return 0


def _pid(body: dict[str, Any]) -> dict[str, Any]:
    try:
        return {"PandaID": int(body["job"]["PandaID"])}
    except (KeyError, TypeError, ValueError):
        return {}


def run_one(
    definition: dict[str, Any],
    args: Any,
    ap: HarvesterAccessPoint,
    upstream: HarvesterUpstream,
    stop: StopSignal,
    base: PilotConfig | None = None,
) -> tuple[str, int]:
    """One job's life, as ``pilot run`` lives it; never raises."""
    try:
        job = Job.from_panda(definition)
    except PilotError as exc:  # rank 0 validated it; a second look is cheap
        pid = _pid({"job": definition}).get("PandaID", 0)
        ap.fail_worker({pid: exc}, kill=False)
        return "failed", int(exc.code)
    t0 = time.monotonic()
    result = run_job(
        job, job_config(args, ap, job, base), upstream, stop=stop, monitor_factory=make_monitor
    )
    log.info(
        "job %d: %s in %.0f s (pilotErrorCode %d)",
        job.panda_id,
        result.state,
        time.monotonic() - t0,
        result.pilot_error_code,
    )
    return result.state, int(result.pilot_error_code)


def is_whole_jobs(args: Any) -> bool:
    """Whether ``--harvester`` gives this worker whole ordinary jobs: a ManyToOne worker,
    or a OneToOne worker whose job is not an event-service job."""
    if not getattr(args, "harvester", None):
        return False
    try:
        ap = HarvesterAccessPoint(Path(args.harvester), map_type=args.harvester_map_type)
        if ap.many_jobs:
            return True
        jobs = ap.scan_jobs().jobs
    except PilotError:
        return False  # the error is reported by the event-service path
    return bool(jobs) and not any(job.event_service for job in jobs)
