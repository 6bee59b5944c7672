"""Yoda's decisions, as a state machine driven by messages and the clock.

No MPI, no upstream, no sleeping here: each ``on_*`` method takes a message
(or a failure, or the time) and returns the envelopes to send. That keeps
every rule testable in a unit test and lets the scale simulator drive 100,000
virtual droids through the in-process transport.

Rules:

* Prefetch: a droid with ``slots`` cores may hold at most ``high`` leased
  ranges (``high_per_slot * slots``); it asks again when it holds fewer than
  ``low``. Nobody waits for Yoda, and at the end nothing is hoarded.
* A request that cannot be served now (no READY range yet) is remembered and
  served as soon as ranges arrive, instead of making the droid poll.
* Leases have deadlines. A heartbeat renews the leases of ranges the droid
  has queued but not started; a started range must finish within
  ``lease_s``. An expired lease is released (an attempt is charged) and the
  range goes to someone else; a result arriving later is dropped.
* A droid silent for ``hb_timeout`` is dead: its leases are released
  (charged) and it is told to STOP in case it is merely slow.
* Walltime: DRAIN is sent ``drain_lead`` seconds before the allocation ends
  (the longest expected range plus the stage-out margin). Ranges a droid
  had not started come back with its BYE and are released *without* charge:
  the walltime is not the range's fault.
* A range whose leases were lost ``max_tries`` times is failed (1224
  ESRECOVERABLE) rather than handed out forever.
* Results are journaled before the ACK that lets the droid forget them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hpc.transport import Envelope, Kind
from hpc.wire import ResultBatch, WorkBatch
from pilot.errors import ErrorCode, error_diag
from yoda.journal import Book
from yoda.ledger import State

log = logging.getLogger(__name__)

Out = list[tuple[int, Envelope]]


@dataclass
class Policy:
    lease_s: float = 600.0  # a started range must finish within this
    hb_interval: float = 10.0  # droids send HB this often
    hb_timeout: float = 60.0  # silent this long = dead
    low_per_slot: float = 1.0
    high_per_slot: float = 2.0
    max_tries: int = 3
    walltime_end: float | None = None  # epoch seconds of the allocation end
    drain_lead: float = 300.0  # longest expected range + stage-out margin
    lease_grace: float = 5.0  # Yoda waits this long past a deadline before releasing
    term_grace: float = 60.0  # a drain without a walltime end (SIGTERM) gives running ranges this


@dataclass
class Droid:
    rank: int
    slots: int
    node: str = ""
    last_seen: float = 0.0
    leased: set[int] = field(default_factory=set)
    want: int = 0  # unserved request
    alive: bool = True
    bye: bool = False
    draining: bool = False
    acked: int = -1
    # PandaID -> (updateJob memory and I/O fields, samples), told with BYE
    metrics: dict[int, tuple[dict[str, int], int]] = field(default_factory=dict)
    job_cpu: dict[int, float] = field(default_factory=dict)  # PandaID -> its share of cpu

    def high(self, p: Policy) -> int:
        return max(1, int(round(p.high_per_slot * self.slots)))

    def low(self, p: Policy) -> int:
        return max(1, int(round(p.low_per_slot * self.slots)))


class Scheduler:
    """Decides who gets which range; only :class:`Book` changes the ledger."""

    def __init__(
        self,
        book: Book,
        policy: Policy | None = None,
        *,
        epoch: int = 0,
        queue: dict[str, Any] | None = None,
        started: float | None = None,
    ) -> None:
        self.book = book
        self.queue = queue  # the queue's description, for the droids' guard rails
        self.started = started  # epoch s: when rank 0 started the jobs (their walltime)
        self.ledger = book.ledger
        self.p = policy or Policy()
        self.epoch = epoch
        self.droids: dict[int, Droid] = {}
        self.draining = False
        self.exhausted = False  # the upstream has no more ranges for any job
        self.decisions = 0
        self._now = 0.0
        self._expected: dict[int, float] = {}
        self.dropped = 0  # late, duplicate or unknown messages
        self._seq = 0

    # -- helpers -------------------------------------------------------------

    def _env(self, kind: Kind, body: Any = None, seq: int | None = None) -> Envelope:
        self._seq += 1
        return Envelope(kind, self._seq if seq is None else seq, self.epoch, body)

    def config_body(self) -> dict[str, Any]:
        return {
            "jobs": self.book.jobs,
            "lease_s": self.p.lease_s,
            "hb_interval": self.p.hb_interval,
            "low_per_slot": self.p.low_per_slot,
            "high_per_slot": self.p.high_per_slot,
            "queue": self.queue,
            "started": self.started,
        }

    def live(self) -> list[Droid]:
        return [d for d in self.droids.values() if d.alive and not d.bye]

    def wanted(self, reserve: int = 0) -> int:
        """Ranges the droids could take now beyond what is READY (the upstream fetch size),
        plus ``reserve`` more kept READY for the next requests."""
        live = [d for d in self.live() if not d.draining]
        if not live:
            return 0
        want = sum(d.high(self.p) - len(d.leased) for d in live) + reserve
        return max(0, want - self.ledger.count(State.READY))

    def expect(self, ranks: list[int], now: float) -> None:
        """Ranks that should say HELLO; one silent for ``hb_timeout`` counts as dead."""
        for rank in ranks:
            self._expected.setdefault(rank, now)

    def finished(self) -> bool:
        """True when every droid said BYE or died (and at least one ever came, or was expected)."""
        if self._expected:
            return not self.live() and all(r in self.droids for r in self._expected)
        return bool(self.droids) and not self.live()

    # -- messages ------------------------------------------------------------

    def on_message(self, env: Envelope, now: float) -> Out:
        self._now = now
        handler = _HANDLERS.get(env.kind)
        droid = self.droids.get(env.source)
        if env.kind is not Kind.HELLO and (droid is None or not droid.alive):
            self.dropped += 1
            log.info("dropped %s from unknown or dead rank %d", env.kind.name, env.source)
            return []
        if droid is not None:
            droid.last_seen = now
        if handler is None:
            self.dropped += 1
            log.info("dropped unexpected %s from rank %d", env.kind.name, env.source)
            return []
        return handler(self, env, now)

    def _hello(self, env: Envelope, now: float) -> Out:
        body = env.body if isinstance(env.body, dict) else {}
        slots = body.get("slots", 1)
        slots = slots if isinstance(slots, int) and slots > 0 else 1
        old = self.droids.get(env.source)
        out: Out = []
        if old is not None and old.leased:  # a restarted droid: its old leases are void
            out += self._lose(old, charge=False)
        d = Droid(env.source, slots, str(body.get("node", "")), last_seen=now)
        self.droids[env.source] = d
        out.append((d.rank, self._env(Kind.CONFIG, self.config_body())))
        if self.draining:
            d.draining = True
            out.append((d.rank, self._env(Kind.DRAIN, {"by": self._drain_by()})))
        return out

    def _work_req(self, env: Envelope, now: float) -> Out:
        d = self.droids[env.source]
        body = env.body if isinstance(env.body, dict) else {}
        want = body.get("want", 0)
        d.want = want if isinstance(want, int) and want > 0 else 0
        return self._serve(d, now)

    def _serve(self, d: Droid, now: float) -> Out:
        if d.want <= 0 or not d.alive or d.bye:
            return []
        if d.draining:
            d.want = 0
            return [(d.rank, self._env(Kind.WORK, WorkBatch.none_left().body()))]
        n = min(d.want, d.high(self.p) - len(d.leased))
        rows = self.ledger.next_ready(n)  # none when n <= 0
        if not len(rows):
            if self.exhausted and self.ledger.count(State.READY) == 0:
                d.want = 0
                return [(d.rank, self._env(Kind.WORK, WorkBatch.none_left().body()))]
            return []  # remembered in d.want, served when ranges arrive
        self.book.lease(rows, d.rank, now + self.p.lease_s)
        d.leased.update(rows.tolist())
        d.want = max(0, d.want - len(rows))
        self.decisions += len(rows)
        return [(d.rank, self._env(Kind.WORK, self.ledger.work_batch(rows).body()))]

    def serve_waiting(self, now: float) -> Out:
        """Serve remembered requests, e.g. after ranges arrived or the upstream ran dry."""
        out: Out = []
        for d in self.live():
            if d.want > 0:
                out += self._serve(d, now)
        return out

    def _update(self, env: Envelope, now: float) -> Out:
        d = self.droids[env.source]
        body = env.body if isinstance(env.body, dict) else {}
        try:
            batch = ResultBatch.from_body(body)
        except ValueError as exc:
            self.dropped += 1
            log.info("dropped malformed results from rank %d: %s", d.rank, exc)
            batch = ResultBatch.empty()
        # late (lease expired), duplicate, unknown, or not this row's range
        ok = self.ledger.held_by(batch.rows, batch.cols["key"], d.rank)
        if not ok.all():
            bad = batch.rows[~ok]
            self.dropped += len(bad)
            log.info(
                "dropped %d results not leased to rank %d, e.g. row %d", len(bad), d.rank, bad[0]
            )
            batch = batch.select(ok)
        self.book.done(d.rank, batch)
        d.leased.difference_update(batch.rows.tolist())
        self.decisions += len(batch)
        d.acked = max(d.acked, env.seq)
        out: Out = [(d.rank, self._env(Kind.ACK, {"upto": env.seq}))]
        released = body.get("released") or []
        if released:
            out += self._take_back(d, released, charge=False)
        refused = body.get("refused") or []
        if refused:  # its payload gave up on their job: an attempt each
            out += self._take_back(d, refused, charge=True)
        if d.want > 0:  # a request that overtook these results (WORK is probed before RESULT)
            out += self._serve(d, now)
        return out

    def _take_back(self, d: Droid, rows: list[Any], charge: bool) -> Out:
        mine = []
        for row in rows:
            if isinstance(row, int) and row in d.leased:
                mine.append(row)
                d.leased.discard(row)
        if charge:
            return self._release_or_fail(mine, charge=True)
        self.book.release(mine, charge=charge)
        return self.serve_waiting_after_release(mine)

    def serve_waiting_after_release(self, rows: list[int]) -> Out:
        # Released ranges go to whoever is waiting; the clock is not needed for that
        # decision beyond the lease deadline, taken from the last message time.
        if not rows:
            return []
        return self.serve_waiting(self._now)

    def _hb(self, env: Envelope, now: float) -> Out:
        d = self.droids[env.source]
        body = env.body if isinstance(env.body, dict) else {}
        queued = [r for r in body.get("queued", []) or [] if isinstance(r, int) and r in d.leased]
        if queued:
            self.ledger.extend(queued, now + self.p.lease_s)  # renewals are not journaled:
            # a resumed Yoda releases every lease of its previous life anyway
        return []

    def _bye(self, env: Envelope, now: float) -> Out:
        d = self.droids[env.source]
        body = env.body if isinstance(env.body, dict) else {}
        out = self._take_back(d, body.get("released") or [], charge=False)
        out += self._take_back(d, body.get("refused") or [], charge=True)
        if d.leased:  # said goodbye holding leases it did not report: not its fault to charge
            out += self._lose(d, charge=False)
        d.bye = True
        d.want = 0
        d.metrics, d.job_cpu = _metrics(body.get("metrics"))
        return out + [(d.rank, self._env(Kind.STOP, {}))]

    # -- failures and the clock ---------------------------------------------

    def on_failed(self, rank: int, now: float) -> Out:
        self._now = now
        d = self.droids.get(rank)
        if d is None or not d.alive:
            return []
        log.warning("droid rank %d is dead; releasing %d leases", rank, len(d.leased))
        d.alive = False
        return self._lose(d, charge=True)

    def _lose(self, d: Droid, charge: bool) -> Out:
        rows = sorted(d.leased)
        d.leased.clear()
        return self._release_or_fail(rows, charge)

    def _release_or_fail(self, rows: list[int], charge: bool) -> Out:
        if not rows:
            return []
        tries = self.ledger.rows["tries"]
        spent = [r for r in rows if charge and tries[r] + 1 >= self.p.max_tries]
        if spent:
            diag = error_diag(ErrorCode.ESRECOVERABLE, "range lost its lease too often")
            gone = np.asarray(spent, dtype=np.int64)
            failed = ResultBatch.failed(
                gone, self.ledger.keys(gone), int(ErrorCode.ESRECOVERABLE), diag
            )
            self.book.done(-1, failed)
        spent_set = set(spent)
        back = [r for r in rows if r not in spent_set]
        self.book.release(back, charge=charge)
        return self.serve_waiting(self._now)

    def tick(self, now: float) -> Out:
        """Time-driven rules: dead droids, expired leases, the walltime drain."""
        self._now = now
        out: Out = []
        for rank, since in self._expected.items():
            if rank not in self.droids and now - since > self.p.hb_timeout:
                log.warning("rank %d never said HELLO: counted as dead", rank)
                self.droids[rank] = Droid(rank, 1, alive=False)
        for d in list(self.live()):
            if now - d.last_seen > self.p.hb_timeout:
                log.warning(
                    "droid rank %d silent for %.0f s: declared dead", d.rank, now - d.last_seen
                )
                out += self.on_failed(d.rank, now)
                out.append((d.rank, self._env(Kind.STOP, {"reason": "heartbeat timeout"})))
                continue
            if not d.leased:
                continue
            held = np.fromiter(d.leased, dtype=np.int64, count=len(d.leased))
            due = self.ledger.rows["deadline"][held] + (self.ledger.t0 + self.p.lease_grace)
            expired = np.sort(held[due < now]).tolist()
            if expired:
                log.warning("rank %d: %d leases expired", d.rank, len(expired))
                d.leased.difference_update(expired)
                out += self._release_or_fail(expired, charge=True)
        if (
            not self.draining
            and self.p.walltime_end is not None
            and now >= self.p.walltime_end - self.p.drain_lead
        ):
            out += self.drain(now)
        return out

    def _drain_by(self) -> float:
        if self.p.walltime_end is None:
            return self._now
        return self.p.walltime_end - max(0.0, self.p.drain_lead * 0.2)

    def drain(self, now: float) -> Out:
        """Stop handing out ranges; droids finish what they run and give back the rest."""
        self._now = now
        self.draining = True
        out: Out = []
        by = self._drain_by() if self.p.walltime_end is not None else now + self.p.term_grace
        for d in self.live():
            d.draining = True
            out.append((d.rank, self._env(Kind.DRAIN, {"by": by})))
        return out

    def stop_all(self) -> Out:
        return [(d.rank, self._env(Kind.STOP, {})) for d in self.droids.values() if d.alive]


def _metrics(body: Any) -> tuple[dict[int, tuple[dict[str, int], int]], dict[int, float]]:
    """A BYE's per-job figures, what of them is well formed: PandaID -> (integer fields,
    samples), and PandaID -> CPU seconds. A droid's figures are reported, not trusted:
    anything else is left out."""
    out: dict[int, tuple[dict[str, int], int]] = {}
    cpu: dict[int, float] = {}
    if not isinstance(body, dict):
        return out, cpu
    for key, got in body.items():
        if not (isinstance(key, str) and key.isdigit() and isinstance(got, dict)):
            continue
        seconds = got.get("cpu")
        if isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and seconds >= 0:
            cpu[int(key)] = float(seconds)
        fields, samples = got.get("fields"), got.get("samples")
        if not isinstance(fields, dict) or not isinstance(samples, int) or samples < 1:
            continue
        ok = {
            k: int(v)
            for k, v in fields.items()
            if isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0
        }
        if ok:
            out[int(key)] = (ok, samples)
    return out, cpu


_HANDLERS = {
    Kind.HELLO: Scheduler._hello,
    Kind.WORK_REQ: Scheduler._work_req,
    Kind.UPDATE: Scheduler._update,
    Kind.HB: Scheduler._hb,
    Kind.BYE: Scheduler._bye,
}
