"""A Droid: one rank > 0 that keeps its cores busy with ranges from Yoda.

It says HELLO, gets the job definitions (CONFIG), and then keeps a small
queue of leased ranges between the low and high watermarks: it asks for more
(WORK_REQ) when it holds fewer than ``low``, and feeds the payload executor
(:class:`pilot.eventservice.executor.EventExecutor`, one per PandaID) only as
much as the executor wants. Ranges still in the Droid's own queue have not
started, so at DRAIN they go straight back to Yoda without costing anything.

Results come out of the executor with their output already renamed into
place and checksummed; they are sent in batches (UPDATE) and kept until Yoda
ACKs them. A payload that dies is the executor's business (it restarts it and
fails the range it was on); a hung range is killed by the executor's
``range_timeout``, which is the lease Yoda gave.

Waiting costs nothing: the Droid blocks in the executor's poll (a socket
wait) or in the transport's backoff, never spins. On STOP, on Yoda's death
(ULFM) or when it is done, it returns from :meth:`Droid.run`; the caller
ends with MPI_Finalize, never Abort.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from droid.executors import Executor, ExecutorFactory, event_executor
from hpc.transport import Envelope, Kind, PeerFailed, Transport
from hpc.wire import ResultBatch, WorkBatch
from pilot.errors import PilotError
from pilot.job import Job

log = logging.getLogger(__name__)
YODA = 0


@dataclass
class DroidOptions:
    slots: int = 1
    update_batch: int = 50
    update_interval: float = 0.5
    hello_timeout: float = 60.0  # no CONFIG in this long: give up
    hello_retry: float = 5.0
    yoda_timeout: float = 300.0  # no word from Yoda in this long: give up
    stop_grace: float = 5.0
    poll_max: float = 0.2  # longest wait in one turn of the loop


class Droid:
    def __init__(
        self,
        transport: Transport,
        workdir: str | Path,
        executor_factory: ExecutorFactory = event_executor,
        options: DroidOptions | None = None,
        *,
        node: str | None = None,
    ) -> None:
        self.t = transport
        self.workdir = Path(workdir)
        self.factory = executor_factory
        self.o = options or DroidOptions()
        self.node = node or socket.gethostname()
        self.epoch = 0
        self.seq = 0
        self.jobs: dict[int, Job] = {}
        self.executors: dict[int, Executor] = {}
        self.gave_up: set[int] = set()  # jobs whose payload gave up here
        # leased ranges not yet given to a payload, per PandaID, as Yoda sent them
        self.queue: dict[int, deque[WorkBatch]] = {}
        self.rows: set[int] = set()  # ledger rows of everything held (queued or running)
        self.results: list[ResultBatch] = []  # not yet sent
        # counts kept beside the queue and the results: the loop asks for them every
        # turn, and summing dozens of small batches each time cost more than the batches
        self._n_queued = 0
        self._n_results = 0
        self.unacked: dict[int, int] = {}  # UPDATE seq -> results in it
        self.released: list[int] = []  # to give back with the next UPDATE / BYE
        # given back because this droid's payload for their job gave up: Yoda charges
        # an attempt, so a job whose payload fails everywhere ends instead of bouncing
        self.refused: list[int] = []
        self.lease_s = 600.0
        self.hb_interval = 10.0
        self.low_per_slot = 1.0  # watermarks, from Yoda's CONFIG
        self.high_per_slot = 2.0
        self.requested = False
        self.no_more = False
        self.draining = False
        self.drain_by: float | None = None
        self.stopped = False
        self.yoda_dead = False
        self.configured = False
        self.queuedata: dict[str, Any] | None = None  # the queue's description, from CONFIG
        self.started: float | None = None  # when rank 0 started the jobs, from CONFIG
        self._last_hb = 0.0
        self._last_update = time.monotonic()
        self._last_heard = time.monotonic()
        self.done_count = 0
        self.range_cpu: dict[int, float] = {}  # PandaID -> CPU its ranges' results claim
        self._drain_requested = False

    # -- sending -------------------------------------------------------------

    def _send(self, kind: Kind, body: Any) -> int:
        self.seq += 1
        self.t.send(YODA, Envelope(kind, self.seq, self.epoch, body))
        return self.seq

    def held(self) -> int:
        return len(self.rows)

    def _request_work(self) -> None:
        if self.requested or self.no_more or self.draining or not self.configured:
            return
        low = max(1, round(self.low_per_slot * self.o.slots))
        high = max(low + 1, round(self.high_per_slot * self.o.slots))
        if self.held() < low:
            # Yoda frees leases when results arrive: send them first, or it sees
            # this droid still full and waits for the next batch to fetch more.
            self._flush_results(force=True)
            self._send(Kind.WORK_REQ, {"want": high - self.held()})
            log.debug("asked for %d ranges", high - self.held())
            self.requested = True

    def _flush_results(self, force: bool = False) -> None:
        if not self.results and not self.released and not self.refused:
            return
        if (
            not force
            and not self.released
            and not self.refused
            and self._n_results < self.o.update_batch
            and time.monotonic() - self._last_update < self.o.update_interval
        ):
            return
        batch = ResultBatch.concat(self.results)
        self.results = []
        self._n_results = 0
        released, self.released = self.released, []
        refused, self.refused = self.refused, []
        body = batch.body()
        body["released"] = released
        if refused:
            body["refused"] = refused
        self.unacked[self._send(Kind.UPDATE, body)] = len(batch)
        self._last_update = time.monotonic()

    def _heartbeat(self) -> None:
        now = time.monotonic()
        if now - self._last_hb < self.hb_interval:
            return
        self._last_hb = now
        running: set[int] = set()
        for ex in self.executors.values():
            running.update(ex.in_flight())
        queued = sorted(self.rows - running)
        try:
            load = os.getloadavg()[0]
        except OSError:
            load = -1.0
        self._send(Kind.HB, {"queued": queued, "load1": load, "held": self.held()})

    # -- receiving -----------------------------------------------------------

    def _handle(self, got: Envelope | PeerFailed) -> None:
        if isinstance(got, PeerFailed):
            if got.rank == YODA:
                log.error("Yoda (rank 0) is dead: stopping")
                self.yoda_dead = True
            return
        if got.source != YODA:
            log.info("dropped %s from rank %d", got.kind.name, got.source)
            return
        self._last_heard = time.monotonic()
        if got.kind is Kind.CONFIG:
            self._config(got)
        elif got.epoch != self.epoch:
            log.info("dropped %s of epoch %d (mine %d)", got.kind.name, got.epoch, self.epoch)
        elif got.kind is Kind.WORK:
            self._work(got.body if isinstance(got.body, dict) else {})
        elif got.kind is Kind.ACK:
            upto = got.body.get("upto", -1) if isinstance(got.body, dict) else -1
            for seq in [s for s in self.unacked if s <= upto]:
                self.done_count += self.unacked.pop(seq)
        elif got.kind is Kind.DRAIN:
            by = got.body.get("by") if isinstance(got.body, dict) else None
            self._drain(by if isinstance(by, (int, float)) else None)
        elif got.kind is Kind.STOP:
            self.stopped = True
        else:
            log.info("dropped unexpected %s", got.kind.name)

    def _config(self, env: Envelope) -> None:
        body = env.body if isinstance(env.body, dict) else {}
        self.epoch = env.epoch
        self.lease_s = float(body.get("lease_s", self.lease_s))
        self.hb_interval = float(body.get("hb_interval", self.hb_interval))
        self.low_per_slot = float(body.get("low_per_slot", self.low_per_slot))
        self.high_per_slot = float(body.get("high_per_slot", self.high_per_slot))
        queue = body.get("queue")
        self.queuedata = queue if isinstance(queue, dict) else None
        started = body.get("started")
        self.started = float(started) if isinstance(started, (int, float)) else None
        for d in body.get("jobs", []) or []:
            try:
                job = Job.from_panda(d)
            except PilotError as exc:
                log.error("job definition rejected: %s", exc)
                continue
            self.jobs[job.panda_id] = job
        self.configured = True

    def _work(self, body: Any) -> None:
        """Ranges come as columns (:class:`hpc.wire.WorkBatch`): Yoda validated them when
        they came from upstream, so they are rebuilt here without parsing again."""
        self.requested = False
        try:
            batch = WorkBatch.from_body(body)
        except ValueError as exc:
            log.error("WORK dropped: %s", exc)
            return
        log.debug("got %d ranges, no_more=%s", len(batch), batch.no_more)
        if batch.no_more:
            self.no_more = True
        if not len(batch):
            return
        rows = batch.cols["row"]
        listed = rows.tolist()
        if not self.rows.isdisjoint(listed):  # sent twice: keep the copy already held
            batch = batch.select(~self._held(listed))
            listed = batch.cols["row"].tolist()
        if self.draining:
            self.released.extend(listed)
            return
        self.rows.update(listed)
        for job, (_, panda_id) in batch.jobs.items():
            part = batch if len(batch.jobs) == 1 else batch.select(batch.cols["job"] == job)
            if len(part):
                self.queue.setdefault(panda_id, deque()).append(part)
                self._n_queued += len(part)

    def _held(self, rows: list[int]) -> np.ndarray:
        """Mask of ``rows`` this droid holds."""
        return np.fromiter((r in self.rows for r in rows), bool, len(rows))

    def queued(self) -> int:
        return self._n_queued

    def _give_back(self, rows: list[int], refused: bool = False) -> None:
        """Ranges this droid will not run: back to Yoda with the next UPDATE or the BYE."""
        mine = [r for r in rows if r in self.rows]
        self.rows.difference_update(mine)
        (self.refused if refused else self.released).extend(mine)

    def _took(self, res: ResultBatch, panda_id: int) -> bool:
        """Results from ``panda_id``'s executor: kept for the next UPDATE if the range is
        still held. True if there were any (the loop made progress)."""
        if not len(res):
            return False
        self.range_cpu[panda_id] = self.range_cpu.get(panda_id, 0.0) + float(res.cols["cpu"].sum())
        listed = res.rows.tolist()
        if not self.rows.issuperset(listed):  # e.g. given back at a drain deadline
            held = self._held(listed)
            log.warning("%d results for ranges not held dropped", len(listed) - int(held.sum()))
            res = res.select(held)
            listed = res.rows.tolist()
        self.rows.difference_update(listed)
        self.results.append(res)
        self._n_results += len(res)
        return True

    def _drain(self, by: float | None) -> None:
        log.warning("DRAIN: finishing running ranges by %s", by)
        self.draining = True
        self.drain_by = by
        for q in self.queue.values():
            for work in q:
                self._give_back(work.cols["row"].tolist())
        self.queue.clear()
        self._n_queued = 0
        for ex in self.executors.values():
            ex.no_more_ranges()
        self._flush_results(force=True)

    # -- executors -----------------------------------------------------------

    def _executor(self, panda_id: int) -> Executor | None:
        ex = self.executors.get(panda_id)
        if ex is None:
            job = self.jobs.get(panda_id)
            if job is None:
                return None
            ex = self.factory(job, self.workdir / str(panda_id), self.o.slots, self.lease_s)
            ex.start()
            self.executors[panda_id] = ex
        return ex

    def adopt(self, panda_id: int, executor: Executor) -> None:
        """Run ``panda_id``'s ranges on an executor already started by the caller (the
        one-node arrangement starts its payload before any range is fetched, so a payload
        that cannot start costs no range)."""
        self.executors[panda_id] = executor

    def _feed(self) -> None:
        """Give each executor as many of its queued ranges as it wants; the rest stay here."""
        for pid, ex in self.executors.items():
            if getattr(ex, "error", None) is not None and pid not in self.gave_up:
                # its payload gave up: what it holds goes back, an attempt charged each
                self.gave_up.add(pid)
                left = ex.stop(self.o.stop_grace)
                self._took(ex.poll(0.0), pid)
                self._give_back(left, refused=True)
                log.error("job %d: payload gave up, %d ranges given back", pid, len(left))
        for pid, q in list(self.queue.items()):
            if not q:
                continue
            ex = self._executor(pid)
            if ex is None or getattr(ex, "error", None) is not None:
                # no job for it, or its payload gave up: someone else may do better,
                # but each such return costs the range an attempt
                for work in q:
                    self._give_back(work.cols["row"].tolist(), refused=ex is not None)
                self._n_queued -= sum(len(w) for w in q)
                q.clear()
                continue
            n = ex.wanted()
            while n > 0 and q:
                work = q.popleft()
                if len(work) > n:
                    q.appendleft(work.select(slice(n, None)))
                    work = work.select(slice(n))
                self._n_queued -= len(work)
                ex.add(work)
                n -= len(work)
        if self.no_more and not self.queued():
            for ex in self.executors.values():
                ex.no_more_ranges()

    def _collect(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for Yoda or the payloads; True if anything came."""
        executors = list(self.executors.values())
        ending = self.no_more or self.draining  # payloads must be polled to see them exit
        # ranges held beyond the local queue sit in an executor: its payload may be
        # starting and waiting to be served, so the executors must be polled
        handed = len(self.rows) > self.queued()
        if not executors or not (ending or handed or any(ex.in_flight() for ex in executors)):
            # nothing running here: wait on Yoda (the transport backs off), not on a payload
            if timeout > 0:
                got = self.t.recv(timeout)
                if got is not None:
                    self._handle(got)
                    return True
            return False
        each = timeout / len(executors)
        took = False
        for pid, ex in list(self.executors.items()):
            took |= self._took(ex.poll(each), pid)
        return took

    def _all_done(self) -> bool:
        if self.draining:
            return not self.rows or all(ex.finished for ex in self.executors.values())
        return (
            self.no_more
            and not self.queued()
            and not self.rows
            and all(ex.finished or getattr(ex, "error", None) for ex in self.executors.values())
        )

    # -- the loop ------------------------------------------------------------

    def request_drain(self) -> None:
        """From a signal handler: stop taking ranges at the next turn of the loop."""
        self._drain_requested = True

    def hello(self) -> bool:
        """HELLO until CONFIG arrives; False if Yoda never answers."""
        deadline = time.monotonic() + self.o.hello_timeout
        while time.monotonic() < deadline and not self.configured:
            self._send(Kind.HELLO, {"node": self.node, "slots": self.o.slots, "pid": os.getpid()})
            retry = time.monotonic() + self.o.hello_retry
            while time.monotonic() < min(retry, deadline) and not self.configured:
                got = self.t.recv(timeout=min(retry, deadline) - time.monotonic())
                if got is not None:
                    self._handle(got)
                if self.yoda_dead or self.stopped:
                    return False
        return self.configured

    def run(self) -> int:
        if not self.hello():
            log.error("no CONFIG from Yoda")
            return 1
        quiet = 0.0
        progress = False  # the last wait brought something: no longer one next time
        while not self.stopped and not self.yoda_dead:
            busy = progress
            got = self.t.recv(0.0)
            while got is not None:
                busy = True
                self._handle(got)
                if self.stopped or self.yoda_dead:
                    break
                got = self.t.recv(0.0)
            if self.stopped or self.yoda_dead:
                break
            if self._drain_requested and not self.draining:
                self._drain(None)
            self._request_work()
            self._feed()
            self._heartbeat()
            self._flush_results()
            if self.draining and self.drain_by is not None and time.time() > self.drain_by:
                self._give_back_running()
            if self._all_done():  # the last results go with the goodbye
                return self._goodbye()
            if not (self.requested or self.unacked):
                # Yoda owes nothing: its silence while a long range runs is no sign of death
                self._last_heard = time.monotonic()
            elif time.monotonic() - self._last_heard > self.o.yoda_timeout:
                log.error("no word from Yoda for %.0f s: stopping", self.o.yoda_timeout)
                break
            # wait: short after activity, longer when idle (never a spin)
            quiet = 0.0 if busy else min(self.o.poll_max, max(0.005, quiet * 2 or 0.005))
            progress = self._collect(quiet)
        self._shutdown()
        return 0

    def _give_back_running(self) -> None:
        log.warning("drain deadline passed: stopping payloads, giving back unfinished ranges")
        for pid, ex in self.executors.items():
            self._give_back(ex.stop(self.o.stop_grace))
            self._took(ex.poll(0.0), pid)
        self.drain_by = None

    def _goodbye(self) -> int:
        """Send what is left, wait (bounded) for the ACKs, BYE, and wait for STOP."""
        self._flush_results(force=True)
        deadline = time.monotonic() + 30.0
        while self.unacked and not self.yoda_dead and time.monotonic() < deadline:
            got = self.t.recv(min(1.0, deadline - time.monotonic()))
            if got is not None:
                self._handle(got)
        self._send(
            Kind.BYE,
            {
                "released": self.released,
                "refused": self.refused,
                "done": self.done_count,
                "metrics": self._metrics(),
            },
        )
        self.released, self.refused = [], []
        deadline = time.monotonic() + 30.0
        while not self.stopped and not self.yoda_dead and time.monotonic() < deadline:
            got = self.t.recv(min(1.0, deadline - time.monotonic()))
            if got is not None:
                self._handle(got)
        self._shutdown()
        return 0

    def _metrics(self) -> dict[str, Any]:
        """PandaID -> the job's figures from this droid: the CPU of its payloads and their
        memory and I/O fields. The CPU this droid's reaped payloads used is exact but not
        per job; with several jobs it is split in the shares their ranges' results claim
        (evenly if they claim none), so that no job is charged another's."""
        total = _payload_cpu()
        claimed = sum(self.range_cpu.get(pid, 0.0) for pid in self.executors)
        out: dict[str, Any] = {}
        for panda_id, ex in self.executors.items():
            if claimed > 0:
                share = self.range_cpu.get(panda_id, 0.0) / claimed
            else:
                share = 1.0 / len(self.executors)
            entry: dict[str, Any] = {"cpu": round(total * share, 3)}
            metrics = getattr(ex, "metrics", None)
            try:
                entry.update(metrics() if metrics is not None else {})
            except Exception as exc:  # noqa: BLE001 - a goodbye must not fail on a figure
                log.warning("job %d: no metrics: %s", panda_id, exc)
            out[str(panda_id)] = entry
        return out

    def _shutdown(self) -> None:
        for ex in self.executors.values():
            try:
                ex.stop(self.o.stop_grace)
            except PilotError as exc:
                log.warning("stopping the payload: %s", exc)
        if hasattr(self.t, "flush"):
            self.t.flush(2.0)


def _payload_cpu() -> float:
    """CPU seconds of the payloads this droid ran and reaped (its children), for the
    job's cpuConsumptionTime."""
    t = os.times()
    return round(t.children_user + t.children_system, 3)
