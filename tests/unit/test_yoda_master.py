"""Yoda and Droids together over the in-process transport (threads, a zero-cost payload)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from droid.droid import Droid, DroidOptions
from droid.nullexec import NullExecutor
from hpc.transport import LocalHub
from tests.mpi.fake_upstream import MemoryUpstream, make_ranges
from tests.mpi.invariants import check, journal_outputs
from yoda.journal import Book, Journal, replay, resume_book
from yoda.ledger import Ledger, State
from yoda.link import InlineLink
from yoda.master import Yoda, YodaOptions
from yoda.scheduler import Policy, Scheduler

JOBS = [
    {"PandaID": 501, "taskID": 9, "jobsetID": 9, "transformation": "toysim"},
    {"PandaID": 502, "taskID": 9, "jobsetID": 9, "transformation": "toysim"},
]


def factory(delay=0.0):
    def make(job, workdir: Path, slots, lease_s):
        return NullExecutor(job, workdir, slots, delay=delay, write_outputs=True)

    return make


def run_world(
    tmp_path,
    upstream,
    n_droids=2,
    *,
    book=None,
    epoch=1,
    policy=None,
    before=None,
    delay=0.0,
    kill=None,
    link=None,
):
    hub = LocalHub(n_droids + 1)
    if book is None:
        book = Book(Ledger(), Journal(tmp_path / "journal"))
        book.epoch(epoch)
        for j in JOBS:
            book.add_job(j)
    sched = Scheduler(
        book,
        policy or Policy(hb_interval=0.2, hb_timeout=5, high_per_slot=6, low_per_slot=3),
        epoch=epoch,
    )
    yoda = Yoda(
        hub.endpoint(0),
        upstream,
        sched,
        YodaOptions(update_interval=0.05, retry_min=0.05, retry_max=0.2, bye_wait_s=5),
        link=link(upstream) if link else None,
    )
    droids = [
        Droid(
            hub.endpoint(r),
            tmp_path / f"droid{r}",
            factory(delay),
            DroidOptions(slots=2, update_interval=0.05, hello_timeout=10, yoda_timeout=20),
        )
        for r in range(1, n_droids + 1)
    ]
    threads = [threading.Thread(target=d.run, daemon=True) for d in droids]
    for t in threads:
        t.start()
    if before:
        before(hub, yoda)
    rc = yoda.run(max_seconds=60)
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    return rc, yoda


def test_all_ranges_reported_once_with_their_outputs(tmp_path):
    up = MemoryUpstream({501: make_ranges(9, 501, 40), 502: make_ranges(9, 502, 25)})
    rc, yoda = run_world(tmp_path, up)
    assert rc == 0
    assert len(up.dispatched) == 65
    assert check(up.dispatched, up.updates, outputs=journal_outputs(tmp_path / "journal")) == []
    assert yoda.s.ledger.count(State.FINISHED) == 65
    assert not yoda.book.unsent


def test_upstream_down_for_a_while_loses_nothing(tmp_path):
    up = MemoryUpstream({501: make_ranges(9, 501, 30), 502: []})

    def flap(hub, yoda):
        up.down = True
        threading.Timer(0.5, lambda: setattr(up, "down", False)).start()

    rc, _ = run_world(tmp_path, up, before=flap, delay=0.01)
    assert rc == 0
    assert check(up.dispatched, up.updates, outputs=journal_outputs(tmp_path / "journal")) == []
    assert len(up.updates) == 30


def test_a_dead_droid_ranges_finish_elsewhere(tmp_path):
    up = MemoryUpstream({501: make_ranges(9, 501, 30), 502: []})

    def kill_later(hub, yoda):
        def when_busy():
            for _ in range(500):  # bounded: 5 s
                d = yoda.s.droids.get(2)
                if d is not None and d.leased:
                    break
                time.sleep(0.01)
            hub.kill(2)

        threading.Thread(target=when_busy, daemon=True).start()

    rc, yoda = run_world(tmp_path, up, n_droids=3, before=kill_later, delay=0.02)
    assert rc == 0
    assert check(up.dispatched, up.updates, outputs=journal_outputs(tmp_path / "journal")) == []
    assert yoda.s.ledger.count(State.FINISHED) == 30


def test_drain_on_request_gives_back_unstarted_ranges_uncharged(tmp_path):
    up = MemoryUpstream({501: make_ranges(9, 501, 200), 502: []})

    def drain_soon(hub, yoda):
        threading.Timer(0.3, yoda.request_drain).start()

    rc, yoda = run_world(tmp_path, up, before=drain_soon, delay=0.02)
    assert rc == 0
    led = yoda.s.ledger
    assert led.count(State.LEASED) == 0
    assert led.count(State.READY) > 0  # not all done: drained
    assert int(led.rows["tries"][: led.n].max()) == 0
    released = {led.range_id(r) for r in range(led.n) if led.state(r) is State.READY}
    assert (
        check(
            up.dispatched,
            up.updates,
            released=released,
            outputs=journal_outputs(tmp_path / "journal"),
        )
        == []
    )
    # resume: the rest completes, nothing reported twice
    book, epoch = resume_book(tmp_path / "journal")
    rc, yoda2 = run_world(tmp_path, up, book=book, epoch=epoch)
    assert rc == 0
    assert check(up.dispatched, up.updates, outputs=journal_outputs(tmp_path / "journal")) == []
    assert yoda2.s.ledger.count(State.FINISHED) == 200
    rep = replay(tmp_path / "journal")
    assert rep.ledger.count(State.FINISHED) == 200 and not rep.unsent


def test_a_backlog_of_results_goes_upstream_in_few_calls(tmp_path):
    """update_batch is what makes a call worth it; a backlog goes in calls of update_max."""
    from hpc.wire import ResultBatch
    from pilot.job import EventRange

    class Recorder:
        def __init__(self):
            self.calls = []

        def update_event_ranges(self, entries, version=0):
            self.calls.append(len(entries))
            return [True] * len(entries)

    book = Book(Ledger(), Journal(tmp_path / "journal"))
    job = book.add_job(JOBS[0])
    ranges = [EventRange.from_panda(r) for r in make_ranges(9, 501, 2500)]
    rows = book.add_ranges(job, ranges)
    book.lease(rows, 1, 1e9)
    results = ResultBatch.failed(rows, book.ledger.keys(rows), 0, "", state=State.FINISHED)
    book.done(1, results)
    up = Recorder()
    opts = YodaOptions(update_batch=100, update_max=1000, update_depth=2)
    yoda = Yoda(LocalHub(1).endpoint(0), up, Scheduler(book, epoch=1), opts)
    yoda.push_updates(time.monotonic())
    assert up.calls == [1000, 1000, 500]  # not 25 calls of 100
    assert yoda.reported == 2500 and not yoda.unreported()


def test_the_journal_is_on_stable_storage_before_every_upstream_call(tmp_path, monkeypatch):
    """The durability rule: no upstream call while a journal record is not fsynced."""
    import os

    syncs = {"n": 0}
    real_fsync = os.fsync

    def counting_fsync(fd):
        syncs["n"] += 1
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    book = Book(Ledger(), Journal(tmp_path / "journal", group=True, sync_every=1 << 30))
    book.epoch(1)
    for j in JOBS:
        book.add_job(j)
    unsynced_at_call: list[int] = []

    class Watched(MemoryUpstream):
        def get_event_ranges(self, *args, **kwargs):
            unsynced_at_call.append(book.journal._unsynced)
            return super().get_event_ranges(*args, **kwargs)

        def update_event_ranges(self, *args, **kwargs):
            unsynced_at_call.append(book.journal._unsynced)
            return super().update_event_ranges(*args, **kwargs)

    up = Watched({501: make_ranges(9, 501, 60), 502: make_ranges(9, 502, 40)})
    rc, yoda = run_world(tmp_path, up, book=book)
    assert rc == 0
    assert len(unsynced_at_call) >= 4 and set(unsynced_at_call) == {0}
    assert 0 < syncs["n"] <= len(unsynced_at_call) + 2  # group commit: one fsync per call


class LateLink(InlineLink):
    """Ranges that arrive while results go up, as a link in its own process has them: a
    getEventRanges answer is held back until the next updateEventRanges call is made
    (or, if none is, for 0.1 s)."""

    def __init__(self, upstream):
        super().__init__(upstream)
        self.held = []  # (since, answer)
        self.late = 0

    def fetch(self, *args):
        super().fetch(*args)
        self.held.append((time.monotonic(), self._ready.pop()))

    def update(self, *args):
        super().update(*args)
        self._ready.extend(a for _, a in self.held)
        self.late += len(self.held)
        self.held.clear()

    def answers(self, timeout=0.0):
        while self.held and time.monotonic() - self.held[0][0] > 0.1:
            self._ready.append(self.held.pop(0)[1])
        return super().answers(timeout)


def test_ranges_that_come_in_while_results_go_up_are_handed_out(tmp_path):
    """Droids waiting for ranges are served whichever call took the ranges in: once they
    came with an update's answer, every rank sat idle (READY ranges, droids waiting)."""
    up = MemoryUpstream({501: make_ranges(9, 501, 120), 502: make_ranges(9, 502, 80)})
    links = []

    def late(upstream):
        links.append(LateLink(upstream))
        return links[0]

    # droids ask only once they are empty: nothing of theirs comes to Yoda after it
    policy = Policy(hb_interval=0.2, hb_timeout=5, high_per_slot=6, low_per_slot=0.5)
    rc, yoda = run_world(tmp_path, up, link=late, delay=0.002, policy=policy)
    assert rc == 0
    assert links[0].late > 0
    assert yoda.s.ledger.count(State.FINISHED) == 200
    assert check(up.dispatched, up.updates, outputs=journal_outputs(tmp_path / "journal")) == []
