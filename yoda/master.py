"""The Yoda loop on rank 0: the only link to the upstream.

It moves messages between the transport and the :class:`Scheduler`, fetches
ranges from the upstream when the droids could take more than is READY, and
sends results upstream in batches. A result is journaled before the droid is
ACKed, sent upstream from the journal's "unsent" set, and marked ``sent``
only after the upstream accepted it, so every range is reported once: a
crash before ``sent`` means a resend after ``--resume``, a crash before the
journal write means the range is run again.

The upstream is any object with

* ``get_event_ranges(panda_id, jobset_id, task_id, n_ranges) -> list[dict]``
  (an empty list: the job has no more ranges), and
* ``update_event_ranges(entries, version=0) -> list[bool]`` (per entry: accepted),

which is what ``pilot.comm.panda.PandaClient`` and the Harvester shared-file
source provide. Either may raise :class:`PilotError` when the upstream is
down; the loop then backs off and retries, and nothing is lost meanwhile.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from hpc.transport import Envelope, Kind, PeerFailed, Transport
from hpc.wire import ResultBatch
from pilot.errors import ErrorCode, PilotError, error_diag
from pilot.retry import RetryBackoff
from yoda.ledger import State
from yoda.link import IdParts, InlineLink, Link, Ranges, Updated
from yoda.scheduler import Scheduler

log = logging.getLogger(__name__)


class RangeSource(Protocol):
    def get_event_ranges(
        self, panda_id: int, jobset_id: int, task_id: int, n_ranges: int
    ) -> list[dict[str, Any]]: ...

    def update_event_ranges(
        self, entries: list[dict[str, Any]], version: int = 0
    ) -> list[bool]: ...


@dataclass
class YodaOptions:
    update_batch: int = 200  # results worth an updateEventRanges call before update_interval
    update_max: int = 10_000  # results per call at most: a backlog goes out in a few calls
    update_interval: float = 1.0  # s: a partial batch waits at most this long
    fetch_min: int = 8  # never ask the upstream for fewer ranges than this
    fetch_max: int = 1000
    # ranges kept READY beyond what the droids can hold: a request is served at once
    # while the next upstream batch is being read, instead of waiting for it
    reserve: int = 0
    fetch_depth: int = 2  # getEventRanges calls on their way per job: the link never idles
    update_depth: int = 2  # updateEventRanges calls on their way
    tick_interval: float = 0.5
    retry_min: float = 0.5  # backoff after an upstream failure
    retry_max: float = 30.0
    max_rejections: int = 5  # an entry the upstream refuses this often is given up
    final_flush_s: float = 60.0  # time to get the last updates through at the end
    bye_wait_s: float = 30.0  # after the drain deadline, how long to wait for BYEs
    # getEventRanges failures in a row after which the job has no more ranges (and Yoda
    # keeps the error: see Yoda.error); None: retry until the drain
    max_fetch_failures: int | None = None
    pending_wait: float = 1.0  # an upstream whose answer is on its way is asked again then
    barren_answers: int = 3  # answers in a row with nothing new (duplicates): no more ranges


class Yoda:
    """Rank 0. :meth:`run` returns when every droid said BYE (or died) and updates are out."""

    def __init__(
        self,
        transport: Transport,
        upstream: RangeSource,
        scheduler: Scheduler,
        options: YodaOptions | None = None,
        *,
        clock: Callable[[], float] = time.time,
        job_update: Callable[[dict[str, Any]], Any] | None = None,
        link: Link | None = None,
        stop_when: Callable[[], bool] | None = None,
    ) -> None:
        self.t = transport
        self.link: Link = link if link is not None else InlineLink(upstream)
        if hasattr(self.link, "fileno") and hasattr(transport, "wake"):
            transport.wake = self.link  # an answer from the upstream wakes the loop
        self.s = scheduler
        self.book = scheduler.book
        self.o = options or YodaOptions()
        self.clock = clock
        self._dry: set[int] = set()  # PandaIDs without more ranges
        self._fetch_retry = RetryBackoff(self.o.retry_min, self.o.retry_max)
        self._update_retry = RetryBackoff(self.o.retry_min, self.o.retry_max)
        self._last_update = 0.0
        self._rejections: dict[int, int] = {}
        self._stop_requested = False
        # asked before each message and at each turn: the one-node arrangement drains
        # as soon as its payload gave up or the pilot was told to stop
        self.stop_when = stop_when
        self.error: PilotError | None = None  # why ranges stopped coming, if not "no more"
        self._fetch_at = 0.0  # not before: an answer is on its way (Harvester)
        self._barren: dict[int, int] = {}  # job index -> answers in a row adding nothing
        self.reported = 0
        self.fetched = 0
        self.job_update = job_update  # e.g. PandaClient.update_job (updateJob fields)
        self._job_state: dict[int, str] = {}
        self._asked: dict[int, tuple[int, int]] = {}  # fetch request -> (job index, ranges)
        self._unserved = 0  # ranges added since the waiting droids were last served
        self._in_flight: dict[int, ResultBatch] = {}  # update request -> results in it
        self._req = 0

    # -- signals -------------------------------------------------------------

    def request_drain(self) -> None:
        """Called from a SIGTERM handler: drain at the next turn of the loop."""
        self._stop_requested = True

    def _check_stop(self, now: float) -> None:
        if self.s.draining:
            return
        if self._stop_requested or (self.stop_when is not None and self.stop_when()):
            log.warning("asked to stop: draining")
            self._send(self.s.drain(now))

    # -- upstream ------------------------------------------------------------

    def _job_keys(self, job: dict[str, Any]) -> tuple[int, int, int]:
        def num(key: str) -> int:
            try:
                return int(job.get(key) or 0)
            except (TypeError, ValueError):
                return 0

        return num("PandaID"), num("jobsetID"), num("taskID") or num("jediTaskID")

    def fetch(self, now: float) -> None:
        """Ask the upstream for ranges if the droids could use more than is READY or asked for.

        Up to ``fetch_depth`` requests per job on their way, so that the link reads the
        next answer while this one is added; answers are picked up by :meth:`collect`."""
        if self.s.exhausted or self.s.draining or not self._fetch_retry.ready(now):
            return
        if now < self._fetch_at:
            return
        want = self.s.wanted(self.o.reserve) - sum(n for _, n in self._asked.values())
        if want <= 0:
            return
        n = min(self.o.fetch_max, max(self.o.fetch_min, want))
        busy = [job for job, _ in self._asked.values()]
        for job_index, job in enumerate(self.book.jobs):
            panda_id, jobset_id, task_id = self._job_keys(job)
            if panda_id in self._dry or busy.count(job_index) >= self.o.fetch_depth:
                continue
            self._req += 1
            self._asked[self._req] = (job_index, n)
            self._durable()  # ranges fetched before are on disk before the next call
            self.link.fetch(self._req, job_index, panda_id, jobset_id, task_id, n)
            return

    def collect(self, now: float, timeout: float = 0.0) -> int:
        """Take in the link's answers; returns the ranges added. Every call that takes
        answers is one of these, and the ranges it adds wait for :meth:`serve`."""
        added = 0
        for ans in self.link.answers(timeout):
            if isinstance(ans, Ranges):
                added += self._ranges(ans, now)
            else:
                self._updated(ans, now)
        self._unserved += added
        return added

    def serve(self, now: float) -> None:
        """Hand ranges that came in to the droids waiting for them (or tell them none
        will come). Ranges come in with whichever answers are picked up, an update's
        too; a droid whose request waits asks again for nothing, so one missed here
        left every rank idle with ranges READY."""
        if self._unserved or self.s.exhausted:
            self._unserved = 0
            self._send(self.s.serve_waiting(now))

    def _ranges(self, ans: Ranges, now: float) -> int:
        self._asked.pop(ans.req, None)
        job = self.book.jobs[ans.job]
        panda_id = self._job_keys(job)[0]
        if ans.error:
            wait = self._fetch_retry.failed(now)
            log.warning("getEventRanges failed (%s); retry in %.1f s", ans.error, wait)
            limit = self.o.max_fetch_failures
            if limit is not None and self._fetch_retry.failures >= limit:
                self.error = PilotError(
                    ErrorCode.COMMUNICATIONFAILURE,
                    f"no event ranges after {limit} failures: {ans.error}",
                )
                log.error("job %d: %s", panda_id, self.error)
                self._no_more(panda_id)
            return 0
        if ans.pending:
            self._fetch_at = now + self.o.pending_wait
            return 0
        self._fetch_retry.ok()
        intake = ans.intake
        if intake is None:
            log.info("job %d has no more ranges", panda_id)
            self._no_more(panda_id)
            return 0
        for exc in intake.errors[:10]:
            log.error("job %d: upstream range dropped: %s", panda_id, exc)
        if len(intake.errors) > 10:
            log.error("job %d: %d more ranges dropped", panda_id, len(intake.errors) - 10)
        if intake.foreign:
            log.error(
                "%d ranges are not of job %d, e.g. %s: dropped",
                len(intake.foreign),
                panda_id,
                intake.foreign[0],
            )
        rows = self.book.add_columns(ans.job, intake.cols, intake.files)
        self.fetched += len(rows)
        barren = 0 if len(rows) else self._barren.get(ans.job, 0) + 1
        self._barren[ans.job] = barren
        if barren >= self.o.barren_answers:
            log.error("job %d: %d answers in a row brought nothing new: no more", panda_id, barren)
            self._no_more(panda_id)
        return len(rows)

    def _no_more(self, panda_id: int) -> None:
        self._dry.add(panda_id)
        if all(self._job_keys(j)[0] in self._dry for j in self.book.jobs):
            self.s.exhausted = True

    def unreported(self) -> int:
        """Results journaled and not yet taken by the upstream (waiting, or on their way)."""
        return len(self.book.unsent) + sum(len(b) for b in self._in_flight.values())

    def push_updates(self, now: float, force: bool = False) -> None:
        """Send journaled results upstream: up to ``update_depth`` calls on their way, each
        taking what waits (at most ``update_max``) once ``update_batch`` results or
        ``update_interval`` make it worth it."""
        unsent = self.book.unsent
        budget = len(unsent)  # each result tried at most once per push
        while (
            budget > 0
            and len(self._in_flight) < self.o.update_depth
            and self._update_retry.ready(now)
        ):
            if (
                not force
                and len(unsent) < self.o.update_batch
                and now - self._last_update < self.o.update_interval
            ):
                return
            chunk = unsent.take(min(self.o.update_max, budget))
            budget -= len(chunk)
            self._req += 1
            self._in_flight[self._req] = chunk
            self._last_update = now
            self._durable()  # the results' DONE records: a crash must not run them again
            self.link.update(self._req, chunk, IdParts(*self.s.ledger.id_parts(chunk.rows)))
            self.collect(now)  # an inline link has answered already

    def _updated(self, ans: Updated, now: float) -> None:
        chunk = self._in_flight.pop(ans.req, None)
        if chunk is None:
            return
        unsent = self.book.unsent
        if ans.ok is None:
            unsent.put_back(chunk)
            wait = self._update_retry.failed(now)
            log.warning(
                "updateEventRanges failed (%s); %d results kept, retry in %.1f s",
                ans.error,
                len(unsent),
                wait,
            )
            return
        self._update_retry.ok()
        ok = ans.ok
        refused = np.flatnonzero(~ok)
        if len(refused):
            ids = self.s.ledger.range_ids(chunk.rows[refused])
            for i, rid in zip(refused.tolist(), ids):
                row = int(chunk.rows[i])
                n = self._rejections.get(row, 0) + 1
                self._rejections[row] = n
                if n >= self.o.max_rejections:
                    log.error("upstream refused the result of %s %d times: given up", rid, n)
                    ok[i] = True
        self.book.sent(chunk.rows[ok])
        unsent.add(chunk.select(~ok))  # refused: tried again at the next push
        self.reported += int(ok.sum())

    # -- job state -----------------------------------------------------------

    def job_fields(self, job_index: int, *, worker_end: bool = False) -> dict[str, Any] | None:
        """updateJob fields of a job whose ranges are all done and reported, else None.

        A job with at least one finished range is ``finished`` (PanDA retries the
        failed ranges in a later job); with none it is ``failed``: 1238 ESNOEVENTS
        if it never had a range, else 1224 ESRECOVERABLE. With ``worker_end`` (a
        Harvester worker ends here, drained: no later allocation resumes it) ranges
        given back or never fetched do not hold the job open: PanDA hands them to
        another job once this one is final.
        """
        job = self.book.jobs[job_index]
        panda_id = self._job_keys(job)[0]
        if panda_id not in self._dry and not worker_end:
            return None
        led = self.s.ledger
        rows = led.rows[: led.n]  # columns are read one at a time: no copy of the table
        state = rows["state"]
        mine = rows["job"] == job_index
        if worker_end:
            if (state[mine] == State.LEASED).any():  # still out with a droid
                return None
        elif (state[mine] <= State.LEASED).any():  # READY or LEASED: not done yet
            return None
        pending = [self.book.unsent.rows(), *(b.rows for b in self._in_flight.values())]
        if (rows["job"][np.concatenate(pending)] == job_index).any():
            return None
        finished = mine & (state == State.FINISHED)
        n_finished = int(np.count_nonzero(finished))
        fields: dict[str, Any] = {
            "jobId": panda_id,
            "state": "finished" if n_finished else "failed",
            "nEvents": int(rows["nev"][finished].sum()),
        }
        if job.get("attemptNr") not in (None, ""):
            fields["attemptNr"] = job["attemptNr"]
        if not n_finished:
            code = ErrorCode.ESNOEVENTS if not mine.any() else ErrorCode.ESRECOVERABLE
            fields["pilotErrorCode"] = int(code)
            fields["pilotErrorDiag"] = error_diag(code, f"{int(mine.sum())} ranges, none finished")
        return fields

    def _update_job(self, fields: dict[str, Any]) -> bool:
        if self.job_update is None:
            return True
        self._durable()
        try:
            self.job_update(fields)
        except PilotError as exc:
            log.warning("updateJob %s (%s) failed: %s", fields["jobId"], fields["state"], exc)
            return False
        return True

    def report_jobs(self, *, final: bool, worker_end: bool = False) -> None:
        """``running`` once per job, and the final state of every job that is complete
        (with ``worker_end``: of every job, see :meth:`job_fields`)."""
        for index, job in enumerate(self.book.jobs):
            panda_id = self._job_keys(job)[0]
            if self._job_state.get(panda_id) in ("finished", "failed"):
                continue
            fields = self.job_fields(index, worker_end=worker_end) if final else None
            if fields is None:
                if panda_id not in self._job_state:
                    if self._update_job({"jobId": panda_id, "state": "running"}):
                        self._job_state[panda_id] = "running"
                continue
            if self._update_job(fields):
                self._job_state[panda_id] = fields["state"]
                log.info("job %d: %s, %d events", panda_id, fields["state"], fields["nEvents"])

    # -- loop ----------------------------------------------------------------

    def _commit(self) -> None:
        """Journal records out to the OS before a droid hears of what they record: that
        survives this process dying (docs/DESIGN.md, "Durability")."""
        if self.book.journal is not None:
            self.book.journal.flush()

    def _durable(self) -> None:
        """Journal records on stable storage before the upstream hears of what they
        record: that survives the node crashing. One fsync covers every record since
        the last (group commit), and upstream calls are few."""
        if self.book.journal is not None:
            self.book.journal.sync()

    def _send(self, out: list[tuple[int, Envelope]]) -> None:
        if out:
            self._commit()
        for dest, env in out:
            self.t.send(dest, env)

    def _handle(self, got: Envelope | PeerFailed, now: float) -> None:
        if isinstance(got, PeerFailed):
            self._send(self.s.on_failed(got.rank, now))
            return
        if got.kind is not Kind.HELLO and got.epoch != self.s.epoch:
            self.s.dropped += 1
            log.info("dropped %s of epoch %d from rank %d", got.kind.name, got.epoch, got.source)
            return
        self._send(self.s.on_message(got, now))

    def run(self, *, max_seconds: float | None = None) -> int:
        """The loop. Returns 0 when all went out, 1 if results are left in the journal."""
        start = self.clock()
        self._last_update = start  # a first partial batch waits update_interval too
        self.s.expect(list(range(1, self.t.size)), start)
        self.report_jobs(final=False)
        next_tick = 0.0
        drain_deadline: float | None = None
        while True:
            now = self.clock()
            self._check_stop(now)
            if now >= next_tick:
                self._send(self.s.tick(now))
                next_tick = now + self.o.tick_interval
            self.fetch(now)
            self.collect(now)
            self.push_updates(now)  # takes answers too
            self.serve(now)
            if self.s.finished():
                break
            if self.s.draining:
                if drain_deadline is None:
                    end = self.s.p.walltime_end
                    if end is not None:  # the batch system kills at `end`: be out before
                        drain_deadline = max(now, end - 0.1 * self.s.p.drain_lead)
                    else:
                        drain_deadline = now + self.s.p.term_grace + self.o.bye_wait_s
                if now > drain_deadline:
                    log.warning("droids did not all say BYE in time: stopping them")
                    break
            if max_seconds is not None and now - start > max_seconds:
                log.error("Yoda ran for %.0f s: stopping", now - start)
                break
            self._commit()  # nothing lingers in memory while the loop waits
            got = self.t.recv(timeout=min(self.o.tick_interval, self.o.update_interval))
            # drain everything queued before the periodic work: messages first
            while got is not None:
                now = self.clock()
                self._check_stop(now)
                self._handle(got, now)
                got = self.t.recv(timeout=0.0) if self.t.probe() else None
        return self.finish()

    def finish(self) -> int:
        """STOP the droids, get the last updates through, sync the journal."""
        self._send(self.s.stop_all())
        deadline = self.clock() + self.o.final_flush_s
        while self.unreported() and self.clock() < deadline:
            now = self.clock()
            if not self._in_flight and not self._update_retry.ready(now):
                time.sleep(min(self._update_retry.next_at - now, max(0.0, deadline - now)))
                continue
            self.push_updates(now, force=True)
            self.collect(now, timeout=min(1.0, max(0.0, deadline - now)))
        self.collect(self.clock())  # a fetch answered late: its ranges are journaled, unused
        if not self.unreported():
            self.report_jobs(final=True)
        self.link.close()
        if hasattr(self.t, "flush"):
            self.t.flush(5.0)
        if self.book.journal is not None:
            self.book.journal.sync()
        counts = {s.name: self.s.ledger.count(s) for s in State}
        left = self.unreported()
        log.info("Yoda done: %s, reported %d, unsent %d", counts, self.reported, left)
        return 0 if not left else 1
