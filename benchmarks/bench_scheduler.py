"""Rank 0's scheduler at the scale of the largest allocations, without MPI.

Virtual droids (each one slot group with ``--slots`` slots) talk to the real
:class:`yoda.scheduler.Scheduler` through the in-process transport: HELLO,
WORK_REQ, WORK, UPDATE (every range finished at once), BYE. The upstream
acknowledges every journaled result after each round. Figures: decisions per
second (a lease or an accepted result is one decision), messages per second
through rank 0, and the memory held by Yoda's state (ledger + scheduler).

Baseline from the same run: the in-process transport alone moving the same
kind of messages with no scheduler behind it.

    python benchmarks/bench_scheduler.py          # quick: 10,000 droids, 1M ranges
    python benchmarks/bench_scheduler.py --full   # 100,000 droids, 10M ranges
"""

from __future__ import annotations

import argparse
import gc
import time

import numpy as np
import psutil

from hpc.transport import Envelope, Kind, LocalHub
from hpc.wire import FINISHED, RESULT_DTYPE, ResultBatch, WorkBatch
from yoda.journal import Book
from yoda.ledger import Ledger, State
from yoda.scheduler import Policy, Scheduler

TASK, PANDA, FILE = 4242, 6_100_000_001, 30_000_000_001


def rss() -> int:
    return psutil.Process().memory_info().rss


def transport_baseline(n_msgs: int) -> float:
    hub = LocalHub(2)
    a, b = hub.endpoint(0), hub.endpoint(1)
    body = {"want": 8}
    t0 = time.perf_counter()
    for i in range(n_msgs):
        b.send(0, Envelope(Kind.WORK_REQ, i, 1, body))
        a.recv(0.0)
    return n_msgs / (time.perf_counter() - t0)


def simulate(n_droids: int, n_ranges: int, slots: int) -> dict[str, float]:
    gc.collect()
    mem0 = rss()
    book = Book(Ledger(capacity=n_ranges, t0=time.time()), None)
    job = book.add_job({"PandaID": PANDA, "taskID": TASK, "transformation": "x"})
    book.ledger.intern_file("EVNT.pool.root", "GUID", "mc23", "")
    step = 1_000_000
    for lo in range(0, n_ranges, step):
        k = min(step, n_ranges - lo)
        idx = np.arange(lo, lo + k)
        book.ledger.add_columns(
            job, np.full(k, FILE), idx + 1, np.ones(k), idx * 10, idx * 10 + 9, np.zeros(k)
        )
    sched = Scheduler(book, Policy(lease_s=1e9, hb_timeout=1e9, hb_interval=1e9), epoch=1)
    sched.exhausted = True
    hub = LocalHub(n_droids + 1)
    yoda = hub.endpoint(0)
    droids = [hub.endpoint(r) for r in range(1, n_droids + 1)]
    mem_loaded = rss()

    t0 = time.perf_counter()
    for d in droids:
        d.send(0, Envelope(Kind.HELLO, 0, 0, {"slots": slots, "node": f"n{d.rank}"}))
    messages = 0
    alive = set(range(n_droids))
    rounds = 0
    peak = mem_loaded
    while alive and rounds < 10_000:
        rounds += 1
        now = time.time()
        got = yoda.recv(0.0)
        while got is not None:
            messages += 1
            for dest, env in sched.on_message(got, now):
                yoda.send(dest, env)
            got = yoda.recv(0.0)
        book.sent(book.unsent.take(len(book.unsent)).rows)  # the upstream took everything
        for i in list(alive):
            d = droids[i]
            env = d.recv(0.0)
            while env is not None:
                if env.kind is Kind.CONFIG:
                    d.send(0, Envelope(Kind.WORK_REQ, 1, 1, {"want": 2 * slots}))
                elif env.kind is Kind.WORK:
                    work = WorkBatch.from_body(env.body)
                    if len(work):
                        n = len(work)
                        cols = np.zeros(n, dtype=RESULT_DTYPE)
                        cols["row"], cols["key"] = work.cols["row"], work.cols["key"]
                        cols["state"] = FINISHED
                        done = ResultBatch(cols, [""] * n, [""] * n, [""] * n)
                        d.send(0, Envelope(Kind.UPDATE, 2, 1, done.body()))
                        d.send(0, Envelope(Kind.WORK_REQ, 3, 1, {"want": 2 * slots}))
                    if work.no_more and not len(work):
                        d.send(0, Envelope(Kind.BYE, 4, 1, {}))
                elif env.kind is Kind.STOP:
                    alive.discard(i)
                env = d.recv(0.0)
        peak = max(peak, rss())
    elapsed = time.perf_counter() - t0
    assert book.ledger.count(State.FINISHED) == n_ranges, book.ledger.counts
    return {
        "elapsed": elapsed,
        "decisions": sched.decisions,
        "messages": messages,
        "rounds": rounds,
        "ledger_bytes": book.ledger.nbytes(),
        "yoda_mem": mem_loaded - mem0,
        "peak_mem": peak - mem0,
    }


def report(label: str, n_droids: int, n_ranges: int, slots: int) -> None:
    r = simulate(n_droids, n_ranges, slots)
    print(
        f"{label}: {n_droids:,} droids x {slots} slots, {n_ranges:,} ranges:"
        f" {r['elapsed']:.1f} s, {r['decisions'] / r['elapsed']:,.0f} decisions/s,"
        f" {r['messages'] / r['elapsed']:,.0f} messages/s into rank 0, {r['rounds']} rounds"
    )
    print(
        f"  memory: ledger {r['ledger_bytes'] / n_ranges:.0f} B/range"
        f" ({r['ledger_bytes'] / 1e6:.0f} MB), ledger+hub loaded {r['yoda_mem'] / 1e6:.0f} MB,"
        f" peak during the run {r['peak_mem'] / 1e6:.0f} MB (incl. the virtual droids' mailboxes)"
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--full", action="store_true", help="100,000 droids and 10M ranges")
    p.add_argument("--slots", type=int, default=4)
    args = p.parse_args()
    base = transport_baseline(200_000)
    print(f"baseline: in-process transport alone, {base:,.0f} messages/s (send + recv)")
    report("quick", 10_000, 1_000_000, args.slots)
    if args.full:
        report("full", 100_000, 10_000_000, args.slots)


if __name__ == "__main__":
    main()
