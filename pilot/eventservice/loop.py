"""The single-node event-service loop: ranges in, payload fed, results reported.

``run_event_service`` is what the workflow calls for a job with
``eventService=True``. It asks the *source* for ranges as the executor wants
them (PanDA's getEventRanges through a client, or Harvester's files: both
offer ``get_event_ranges``), feeds the :class:`EventExecutor`, journals every
result in a :class:`ResultSpool` first and reports to the *reporter*
(``update_event_ranges``, v0 entries) in batches of ``batch_size`` or every
``report_interval`` seconds. An upstream that is down is retried with
backoff; what is still undelivered at the end stays in the spool
(``es_results.jsonl`` in the work directory) for :func:`flush_spool`.

An optional ``stage_out(result) -> RangeResult`` hook runs before a finished
range is journaled: a range counts as done only once its output is safe, so
the hook may turn it into a failed one (a PilotError it raises does the
same, with its code). Without it the output stays in the
output directory (Harvester stages it out from there).

``zip_outputs`` reports with ``updateEventRanges`` version 1: the finished
outputs of each report go into one zip (``es_zips/`` in the work directory)
named ``EventService_premerge_<PandaID>_<attemptNr>_<n>.zip`` and are
reported as one ``zipFile`` group (``objstoreID`` when given). A Harvester
reporter always gets per-range outputs (Harvester zips by itself if so
configured).

A ``deadline`` (epoch seconds) or a set ``stop_event`` stops the payload and
*releases* the ranges not done: they are neither failed nor reported, and
PanDA hands them out again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pilot.errors import ErrorCode, PilotError
from pilot.eventservice.executor import FINAL_WAIT, READY_TIMEOUT, EventExecutor
from pilot.eventservice.model import RangeResult, RangeStatus
from pilot.eventservice.spool import SPOOL_NAME, RangeUpdater, ResultSpool
from pilot.job import EventRange, Job
from pilot.monitor.connections import CONNECTION_INTERVAL, ConnectionWatch
from pilot.payload.container import ContainerSpec
from pilot.retry import RetryBackoff

log = logging.getLogger(__name__)

MAX_BACKOFF = 60.0
MAX_LOOPS = 10_000_000  # every loop is bounded; this one by far more than a job's walltime


class RangeSource(Protocol):
    def get_event_ranges(
        self, panda_id: int, jobset_id: int, task_id: int, n_ranges: int
    ) -> list[dict[str, Any]] | None:
        """Ranges; ``[]`` when there are no more; ``None`` while an answer is on its way."""
        ...


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
    zips: list[dict[str, Any]] = field(default_factory=list)
    n_delivered: int = 0
    n_rejected: int = 0
    n_undelivered: int = 0
    restarts: int = 0
    error: PilotError | None = None
    connections: str = ""  # the outbound-connection report, for the log extracts

    @property
    def n_ranges(self) -> int:
        return self.n_finished + self.n_failed + self.n_fatal

    @property
    def error_code(self) -> int:
        """The pilot error the job should carry (0: none): the loop's error, or ESNOEVENTS."""
        if self.error is not None:
            return int(self.error.code)
        return int(ErrorCode.ESNOEVENTS) if self.n_ranges == 0 and not self.released else 0

    def job_fields(self) -> dict[str, Any]:
        return {"nEvents": self.n_events, "cpuConsumptionTime": round(self.cpu, 3)}


def _parse_ranges(raw: Any, seen: set[str]) -> list[EventRange]:
    if not isinstance(raw, list):
        raise PilotError(
            ErrorCode.MESSAGEHANDLINGFAILURE,
            f"event ranges must be a list, got {type(raw).__name__}",
        )
    ranges = []
    for item in raw:
        try:
            r = EventRange.from_panda(item)
        except PilotError as exc:
            log.warning("bad event range skipped: %s", exc)
            continue
        if r.event_range_id in seen:
            log.warning("range %s handed out twice: ignored", r.event_range_id)
            continue
        seen.add(r.event_range_id)
        ranges.append(r)
    return ranges


def flush_spool(
    workdir: str | Path,
    reporter: RangeUpdater,
    batch_size: int = 100,
    version: int = 0,
    objstore_id: int | None = None,
) -> int:
    """Send what an earlier run left undelivered; the number delivered.

    ``version=1`` for a job that ran with ``zip_outputs``: its journaled zips are reused.
    """
    spool = ResultSpool(Path(workdir) / SPOOL_NAME)
    return spool.flush(reporter, batch_size, version=version, objstore_id=objstore_id)


def stored(r: RangeResult, stage_out: Callable[[RangeResult], RangeResult]) -> RangeResult:
    """A finished range once ``stage_out`` stored its output. If that fails the range
    fails with the stage-out's error code (PanDA hands it to a later job): it is never
    reported finished with its output left on a worker node."""
    if r.status is not RangeStatus.FINISHED:
        return r
    try:
        return stage_out(r)
    except PilotError as exc:
        log.warning("range %s: stage-out failed: %s", r.event_range_id, exc)
        return RangeResult(
            r.event_range_id,
            RangeStatus.FAILED,
            cpu=r.cpu,
            wall=r.wall,
            error_code=int(exc.code),
            error_diag=exc.diag,
        )


def run_event_service(
    job: Job,
    workdir: str | Path,
    source: RangeSource,
    reporter: RangeUpdater,
    *,
    output_dir: Path | None = None,
    env: dict | None = None,
    max_restarts: int = 3,
    mode: str | None = None,
    range_timeout: float | None = None,
    batch_size: int = 100,
    report_interval: float = 60.0,
    poll_interval: float = 1.0,
    n_ranges_per_request: int | None = None,
    deadline: float | None = None,
    stop_event: threading.Event | None = None,
    stage_out: Callable[[RangeResult], RangeResult] | None = None,
    max_source_failures: int = 10,
    final_flush_timeout: float = 120.0,
    kill_grace: float = 10.0,
    executor: EventExecutor | None = None,
    zip_outputs: bool = False,
    objstore_id: int | None = None,
    ready_timeout: float | None = READY_TIMEOUT,
    final_wait: float | None = FINAL_WAIT,
    container: ContainerSpec | None = None,
    connections: ConnectionWatch | None = None,
) -> EventServiceSummary:
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    spool = ResultSpool(workdir / SPOOL_NAME)
    summary = EventServiceSummary()
    ranges: dict[str, EventRange] = {}
    seen: set[str] = {r.event_range_id for r in spool.results()}
    ex = executor or EventExecutor(
        job,
        workdir,
        env=env,
        max_restarts=max_restarts,
        output_dir=output_dir,
        mode=mode,
        range_timeout=range_timeout,
        ready_timeout=ready_timeout,
        final_wait=final_wait,
        container=container,
    )
    fetch, report = RetryBackoff(1.0, MAX_BACKOFF), RetryBackoff(2.0, MAX_BACKOFF)
    last_report = time.monotonic()
    no_more = False
    empty_fetches = 0
    not_before = 0.0  # a source with an answer pending is asked again from then on
    next_look = 0.0

    def take(results: list[RangeResult]) -> None:
        if stage_out is not None:
            results = [stored(r, stage_out) for r in results]
        spool.add(results)

    zipping = zip_outputs and not callable(getattr(reporter, "report_results", None))

    def send() -> None:
        if zipping:
            n = len(spool.zips) + 1
            name = f"EventService_premerge_{job.panda_id}_{job.attempt_nr}_{n:05d}.zip"
            spool.zip_pending(workdir / "es_zips", name)
            spool.flush(reporter, batch_size, version=1, objstore_id=objstore_id)
        else:
            spool.flush(reporter, batch_size)

    def try_flush(now: float) -> None:
        nonlocal last_report
        try:
            send()
            report.ok()
        except PilotError as exc:
            log.warning("range updates not delivered, retrying later: %s", exc)
            report.failed(now)
        last_report = now

    try:
        ex.start()
        for _ in range(MAX_LOOPS):
            now = time.monotonic()
            if (stop_event is not None and stop_event.is_set()) or (
                deadline is not None and time.time() >= deadline
            ):
                log.info("event service stopped before the end: releasing unfinished ranges")
                summary.released = ex.stop(kill_grace)
                break
            want = ex.wanted()
            if not no_more and want > 0 and fetch.ready(now) and now >= not_before:
                n = n_ranges_per_request or want
                try:
                    raw = source.get_event_ranges(job.panda_id, job.jobset_id, job.task_id, n)
                    pending = raw is None  # an answer is on its way (Harvester): not an error
                    if pending:
                        not_before = now + poll_interval
                    new = _parse_ranges(raw or [], seen)
                except PilotError as exc:
                    fetch.failed(now)
                    log.warning("getEventRanges failed (%d in a row): %s", fetch.failures, exc)
                    if fetch.failures >= max_source_failures:
                        summary.error = PilotError(
                            ErrorCode.COMMUNICATIONFAILURE, f"no event ranges: {exc.detail}"
                        )
                        no_more = True
                        ex.no_more_ranges()
                else:
                    if not pending:  # only an answer clears the failures
                        fetch.ok()
                        empty_fetches = 0 if new else empty_fetches + 1
                        # An empty answer means no more; a non-empty one with nothing new
                        # (all duplicates or malformed) three times in a row, too.
                        if not raw or empty_fetches >= 3:
                            no_more = True
                            ex.no_more_ranges()
                        for r in new:
                            ranges[r.event_range_id] = r
                        ex.add_ranges(new)
                        continue  # maybe more wanted; results are picked up next round
            wait = poll_interval
            if not no_more and want > 0:
                wait = min(wait, max(0.0, fetch.next_at - now, not_before - now))
            take(ex.poll(wait))
            now = time.monotonic()
            if connections is not None and now >= next_look:
                next_look = now + CONNECTION_INTERVAL
                breach = connections.look(ex.payload, time.time())
                if breach is not None:
                    log.critical("stopping the payload: %s", breach.diag)
                    summary.error = breach
                    summary.released = ex.stop(kill_grace)
                    break
            if spool.n_pending and report.ready(now):
                if spool.n_pending >= batch_size or now - last_report >= report_interval:
                    try_flush(now)
            if ex.finished:
                break
            if ex.error is not None:
                summary.error = ex.error
                summary.released = ex.stop(kill_grace)
                break
    except PilotError as exc:
        log.error("event service failed: %s", exc)
        summary.error = exc
        summary.released = ex.stop(kill_grace)
    finally:
        if not ex.finished and ex.payload is not None and ex.payload.poll() is None:
            summary.released += ex.stop(kill_grace)
    take(ex.poll(0.0))
    if connections is not None:
        # a connection too short for any look is still in the tracer's log
        late = connections.update([], time.time())
        if late is not None and summary.error is None:
            summary.error = late
        summary.connections = connections.report()
    _final_flush(spool, send, final_flush_timeout)
    summary.restarts = ex.restarts
    summary.zips = list(spool.zips)
    for r in spool.results():
        summary.results.append(r)
        if r.status is RangeStatus.FINISHED:
            summary.n_finished += 1
            summary.n_events += (
                ranges[r.event_range_id].n_events if r.event_range_id in ranges else 0
            )
        elif r.status is RangeStatus.FAILED:
            summary.n_failed += 1
        else:
            summary.n_fatal += 1
        summary.cpu += r.cpu
        summary.wall += r.wall
    summary.n_delivered = len(spool.delivered)
    summary.n_rejected = len(spool.rejected)
    summary.n_undelivered = spool.n_pending
    return summary


def _final_flush(spool: ResultSpool, send: Callable[[], None], timeout: float) -> None:
    """Deliver the rest, retrying with backoff for at most ``timeout`` seconds."""
    end = time.monotonic() + timeout
    delay = 1.0
    for _ in range(100):
        if not spool.n_pending:
            return
        try:
            send()
            return
        except PilotError as exc:
            left = end - time.monotonic()
            if left <= 0:
                log.error(
                    "%d range results kept in %s for later: %s", spool.n_pending, spool.path, exc
                )
                return
            log.warning("final range update failed, retrying in %.0f s: %s", min(delay, left), exc)
            time.sleep(min(delay, left))
            delay = min(MAX_BACKOFF, delay * 2)
