"""The single-node event service: Yoda and one Droid in one process.

``pilot run`` runs an event-service job with the engine ``pilot hpc`` runs
under MPI, not with a loop of its own: the same ledger, journal (with the
durability rule of docs/DESIGN.md, "Durability"), scheduler, upstream
batching, drain and resume. Only the arrangement differs: the two ranks are
two threads joined by the in-process transport (:class:`hpc.transport.LocalHub`),
the upstream is called from Yoda's thread (:class:`yoda.link.InlineLink`), and
the payload runs in the job's own directory.

What the arrangement adds, because the pilot around it expects it:

* the payload is started before any range is fetched: one that cannot start
  (transformation not found) fails the job without taking ranges from PanDA;
* Yoda drains as soon as the payload gave up, the pilot is told to stop
  (SIGTERM), or a forbidden connection is seen; a drain gives running ranges
  ``kill_grace`` seconds, and ranges not done are *released*: not reported,
  so PanDA hands them out again;
* the payload runs within the job's guard rails (:class:`pilot.payload.guard.Guard`),
  as every Droid's does: past the job's walltime the ranges in flight fail with
  1213 and Yoda drains (``deadline``, an allocation's end, is for callers that
  have one);
* a work directory that holds a journal of the same job resumes it: results
  the upstream never took are sent, leases of the dead run go back to READY,
  and the ranges are not run twice; a payload the dead run left running there
  (a SIGKILLed pilot cannot end it) is ended first, so that two payloads never
  write the same outputs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from droid.droid import Droid, DroidOptions
from droid.executors import PerRange, RangeExecutor
from hpc.transport import LocalHub
from pilot.errors import ErrorCode, PilotError
from pilot.eventservice.model import RangeResult, RangeStatus
from pilot.job import EventRange, Job
from pilot.monitor.connections import ConnectionWatch
from pilot.payload.runner import end_leftovers
from yoda.journal import Book, journal_results, new_book, resume_book
from yoda.ledger import State
from yoda.link import InlineLink
from yoda.master import Yoda, YodaOptions
from yoda.scheduler import Policy, Scheduler

log = logging.getLogger(__name__)

JOURNAL = "yoda.journal"
DROID = 1  # the droid's rank on the in-process transport
NO_LEASE = 30 * 86400.0  # a job without a range timeout: its walltime ends it first


@dataclass
class OneNode:
    """How the single-node engine talks to its upstream and paces its payload."""

    batch_size: int = 100  # results worth an updateEventRanges call at once
    report_interval: float = 60.0  # s: a partial batch waits at most this long
    n_ranges_per_request: int | None = None  # getEventRanges size (default: what is wanted)
    range_timeout: float | None = 3600.0  # the lease: a started range must finish within it
    deadline: float | None = None  # epoch s: the job's walltime end
    kill_grace: float = 10.0  # running ranges get this long at a drain
    final_flush_timeout: float = 120.0  # to get the last updates through
    max_source_failures: int = 10  # getEventRanges failures in a row before giving up
    slots: int = 1


@dataclass
class EventServiceSummary:
    """What an event-service job came to, for the job's final update."""

    n_finished: int = 0
    n_failed: int = 0
    n_fatal: int = 0
    n_events: int = 0
    cpu: float = 0.0
    wall: float = 0.0
    results: list[RangeResult] = field(default_factory=list)
    released: list[EventRange] = field(default_factory=list)
    n_delivered: int = 0
    n_undelivered: int = 0
    restarts: int = 0
    error: PilotError | None = None
    connections: str = ""  # the outbound-connection report, for the log extracts

    @property
    def n_ranges(self) -> int:
        return self.n_finished + self.n_failed + self.n_fatal

    @property
    def error_code(self) -> int:
        """The pilot error the job should carry (0: none): the run's error, or ESNOEVENTS."""
        if self.error is not None:
            return int(self.error.code)
        return int(ErrorCode.ESNOEVENTS) if self.n_ranges == 0 and not self.released else 0

    def job_fields(self) -> dict[str, Any]:
        return {"nEvents": self.n_events, "cpuConsumptionTime": round(self.cpu, 3)}


def open_book(workdir: Path, job: Job) -> tuple[Book, int]:
    """The job's journal: resumed if an earlier run of this job left one, else new."""
    path = workdir / JOURNAL
    if path.exists():
        book, epoch = resume_book(path, group=True)
        theirs = {int(j.get("PandaID") or 0) for j in book.jobs}
        if theirs and theirs != {job.panda_id}:
            if book.journal is not None:
                book.journal.close()
            raise PilotError(
                ErrorCode.FILEEXISTS,
                f"{path} is the journal of job {sorted(theirs)}, not of {job.panda_id}",
            )
        log.info("resumed %s: epoch %d, %d ranges, %d results unsent",
                 path, epoch, book.ledger.n, len(book.unsent))  # fmt: skip
        if not book.jobs:
            book.add_job(job.raw)
        return book, epoch
    book, epoch = new_book(path)
    book.add_job(job.raw)
    return book, epoch


def run_event_service(
    job: Job,
    workdir: str | Path,
    upstream: Any,
    options: OneNode | None = None,
    *,
    executor: RangeExecutor | None = None,
    stage_out: Callable[[RangeResult], RangeResult] | None = None,
    stop: Any = None,
    connections: ConnectionWatch | None = None,
) -> EventServiceSummary:
    """Run ``job``'s ranges from ``upstream`` (``get_event_ranges``/``update_event_ranges``:
    the PanDA client, or Harvester's files) through ``executor`` (an
    :class:`~pilot.eventservice.executor.EventExecutor` by default); ``stop`` is anything
    with ``is_set()`` (the pilot's signal flag)."""
    from pilot.eventservice.executor import EventExecutor

    o = options or OneNode()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    summary = EventServiceSummary()
    book, epoch = open_book(workdir, job)
    inner = executor or EventExecutor(job, workdir, range_timeout=o.range_timeout)
    ex = PerRange(inner, stage_out)
    lease = o.range_timeout or NO_LEASE
    policy = Policy(
        # One droid: nobody else could use what it holds, and ranges it has not
        # started go back uncharged at a drain, so it holds enough that results and
        # requests travel in batches (2 per slot, as under MPI, costs a message each way
        # per range).
        low_per_slot=16,
        high_per_slot=64,
        lease_s=lease,
        walltime_end=o.deadline,
        drain_lead=o.kill_grace,
        term_grace=o.kill_grace,
        lease_grace=lease,  # the executor's own lease check wins the race
    )
    n = o.n_ranges_per_request
    yoda_options = YodaOptions(
        update_batch=o.batch_size,
        update_interval=o.report_interval,
        fetch_min=n or 1,
        fetch_max=n or 1000,
        fetch_depth=1,
        final_flush_s=o.final_flush_timeout,
        max_fetch_failures=o.max_source_failures,
        retry_max=60.0,
    )
    hub = LocalHub(2)
    watch = _Watch(inner, stop, policy)
    yoda = Yoda(
        hub.endpoint(0),
        upstream,
        Scheduler(book, policy, epoch=epoch),
        yoda_options,
        link=InlineLink(upstream),
        stop_when=watch.should_stop,
    )
    droid = Droid(
        hub.endpoint(DROID),
        workdir,
        _no_factory,
        DroidOptions(slots=max(1, o.slots), stop_grace=o.kill_grace),
    )
    left = end_leftovers(workdir, grace=o.kill_grace)  # a killed pilot's payload, say
    if left:
        log.warning("ended %d payload processes an earlier pilot left here: %s", len(left), left)
    try:
        ex.start()
    except PilotError as exc:
        log.error("the payload did not start: %s", exc)
        summary.error = exc
        try:
            yoda.finish()  # what an earlier run left unsent still goes out
        finally:
            _close(book)
    else:
        droid.adopt(job.panda_id, ex)
        failure: list[BaseException] = []
        thread = threading.Thread(target=_run_droid, args=(droid, hub, failure), name="droid")
        thread.start()
        try:
            yoda.run()
        except BaseException:
            hub.kill(0)  # the droid stops its payload and leaves at once
            raise
        finally:
            thread.join()
            _stop_payload(ex, inner, o.kill_grace)
            _close(book)
        if failure:
            summary.error = PilotError(
                ErrorCode.INTERNALPILOTPROBLEM, f"the droid failed: {failure[0]!r}"
            )
    summary.error = summary.error or yoda.error or getattr(inner, "error", None)
    if connections is not None:
        # a connection too short for any look is still in the tracer's log
        late = connections.update([], time.time())
        if late is not None and summary.error is None:
            summary.error = late
        summary.connections = connections.report()
    _summarise(summary, workdir / JOURNAL, yoda, book)
    summary.restarts = int(getattr(inner, "restarts", 0))
    return summary


def _no_factory(job: Job, workdir: Path, slots: int, lease_s: float) -> Any:
    raise PilotError(ErrorCode.NOTDEFINED, f"job {job.panda_id} is not this engine's job")


def _run_droid(droid: Droid, hub: LocalHub, failure: list[BaseException]) -> None:
    try:
        droid.run()
    except Exception as exc:  # noqa: BLE001 - Yoda must learn the droid is gone, not wait
        log.exception("the droid failed")
        failure.append(exc)
        hub.kill(DROID)


def _stop_payload(ex: PerRange, inner: Any, grace: float) -> None:
    payload = getattr(inner, "payload", None)
    if not ex.finished and payload is not None and payload.poll() is None:
        ex.stop(grace)


def _close(book: Book) -> None:
    if book.journal is not None:
        book.journal.close()


class _Watch:
    """Yoda's reason to drain, asked before every message: the pilot's stop flag, or the
    payload giving up (the guard rails inside the executor end it for a forbidden
    connection, its walltime, ...: :class:`pilot.payload.guard.Guard`)."""

    def __init__(self, inner: Any, stop: Any, policy: Policy) -> None:
        self.inner, self.stop = inner, stop
        self.policy = policy

    def should_stop(self) -> bool:
        if self.stop is not None and self.stop.is_set():
            return True
        if getattr(self.inner, "error", None) is not None:
            self.policy.term_grace = 0.0  # nothing runs any more: no time to give
            return True
        return False


def _summarise(summary: EventServiceSummary, path: Path, yoda: Yoda, book: Book) -> None:
    led = book.ledger
    rows = led.rows[: led.n]
    state = rows["state"]
    for _, r in journal_results(path):
        summary.results.append(r)
        summary.cpu += r.cpu
        summary.wall += r.wall
        if r.status is RangeStatus.FINISHED:
            summary.n_finished += 1
        elif r.status is RangeStatus.FAILED:
            summary.n_failed += 1
        else:
            summary.n_fatal += 1
    summary.n_events = int(rows["nev"][state == State.FINISHED].sum())
    summary.released = [led.event_range(int(i)) for i in (state <= State.LEASED).nonzero()[0]]
    summary.n_delivered = yoda.reported
    summary.n_undelivered = yoda.unreported()


def make_es_runner(
    upstream: Any,
    *,
    stage_out: Callable[[RangeResult], RangeResult] | None = None,
    range_timeout: float | None = None,
    report_interval: float = 30.0,
) -> Callable[..., dict[str, Any]]:
    """A workflow ``es_runner`` bound to one upstream (the PanDA client, or Harvester's
    files): it turns the run's summary into what the final update needs (nEvents, CPU,
    the job's error code). A signal to the pilot drains the run, releases the ranges
    not done (not charged as failures) and fails the job with the signal's code."""
    from pilot.errors import signal_code
    from pilot.eventservice.executor import EventExecutor
    from pilot.eventservice.stageout import range_stage_out
    from pilot.payload.guard import Guard
    from pilot.payload.secrets import job_secrets

    def run(job: Job, workdir: Path, config: Any, stop: Any) -> dict[str, Any]:
        hook = stage_out if stage_out is not None else range_stage_out(job, config)
        # The guard rails every payload runs within (pilot.payload.guard): the job's
        # limits, its walltime (1213 for the ranges in flight, the rest released), the
        # connection policy (one watch, also Yoda's reason to drain), the container.
        guard = Guard(job, workdir, config)
        lease = range_timeout if range_timeout is not None else config.es_range_timeout
        options = OneNode(
            report_interval=report_interval,
            range_timeout=lease,
            kill_grace=config.kill_grace,
        )
        with job_secrets(workdir, job.raw):
            executor = EventExecutor(
                job,
                workdir,
                env=guard.environment(),
                range_timeout=lease,
                ready_timeout=config.es_ready_timeout,
                final_wait=config.es_final_wait,
                container=guard.container,
                guard=guard,
            )
            summary = run_event_service(
                job,
                workdir,
                upstream,
                options,
                executor=executor,
                stage_out=hook,
                stop=stop,
                connections=guard.connections,
            )
        error = summary.error
        if stop is not None and stop.signum is not None:
            error = PilotError(signal_code(stop.signum), f"pilot received signal {stop.signum}")
        elif error is None and summary.error_code:
            error = PilotError(summary.error_code, "the event-service job got no event ranges")
        return {
            "nEvents": summary.n_events,
            "nRanges": summary.n_ranges,
            "finished": summary.n_finished,
            "failed": summary.n_failed,
            "fatal": summary.n_fatal,
            "released": len(summary.released),
            "delivered": summary.n_delivered,
            "undelivered": summary.n_undelivered,
            "restarts": summary.restarts,
            # memory and I/O over every payload process of the job; CPU per range
            "metrics": {**guard.summary(), "cpuConsumptionTime": round(summary.cpu, 3)},
            "connections": summary.connections,
            "error": error,
        }

    return run
