"""Ledger memory per range and journal replay time.

Figures: bytes per range of the numpy ledger at N ranges (target < 64), and
the time to replay a journal holding the whole life of N ranges (added,
leased, finished with a result, acknowledged upstream).

Baselines from the same run: the memory of the obvious alternative (a dict
per range keyed by its id, measured with tracemalloc on a sample and scaled),
and the time just to read the journal's records without applying them.

    python benchmarks/bench_ledger.py            # 1M ranges
    python benchmarks/bench_ledger.py --n 100000 # quick
"""

from __future__ import annotations

import argparse
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from hpc.wire import FINISHED, RESULT_DTYPE, ResultBatch
from yoda.journal import Book, Journal, read_records, replay
from yoda.ledger import Ledger, State

TASK, PANDA, FILE = 4242, 6_100_000_001, 30_000_000_001


def ledger_memory(n: int) -> float:
    led = Ledger(capacity=16)
    led.add_job(PANDA, TASK)
    led.intern_file("EVNT.01234._000001.pool.root.1", "6D9C1C6E-5E1B-4F0B-9E38-1D7B", "mc23", "")
    led.reserve(n)
    step = 100_000
    for lo in range(0, n, step):
        k = min(step, n - lo)
        idx = np.arange(lo, lo + k)
        led.add_columns(
            0, np.full(k, FILE), idx + 1, np.ones(k), idx * 10, idx * 10 + 9, np.zeros(k)
        )
    assert led.count(State.READY) == n
    assert led.find(f"{TASK}-{PANDA}-{FILE}-{n // 2 + 1}-1") == n // 2
    return led.nbytes() / n


def dict_memory(sample: int) -> float:
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    table = {}
    for i in range(sample):
        rid = f"{TASK}-{PANDA}-{FILE}-{i + 1}-1"
        table[rid] = {
            "eventRangeID": rid,
            "startEvent": i * 10,
            "lastEvent": i * 10 + 9,
            "LFN": "EVNT.01234._000001.pool.root.1",
            "GUID": "6D9C1C6E-5E1B-4F0B-9E38-1D7B",
            "scope": "mc23",
            "state": "ready",
            "droid": -1,
            "deadline": 0.0,
        }
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    del table
    return used / sample


def write_journal(path: Path, n: int) -> None:
    book = Book(Ledger(capacity=n), Journal(path, sync_every=10_000))
    book.epoch(1)
    job = book.add_job({"PandaID": PANDA, "taskID": TASK, "transformation": "x"})
    from pilot.job import EventRange

    batch = 1000
    for lo in range(0, n, batch):
        ranges = [
            EventRange(f"{TASK}-{PANDA}-{FILE}-{i + 1}-1", i * 10, i * 10 + 9, "EVNT.pool.root")
            for i in range(lo, min(n, lo + batch))
        ]
        rows = book.add_ranges(job, ranges)
        for k in range(0, len(rows), 10):  # a WORK message leases ~10 ranges
            part = rows[k : k + 10]
            book.lease(part, droid=1 + (k // 10) % 1000, deadline=1e9)
            cols = np.zeros(len(part), dtype=RESULT_DTYPE)
            cols["row"], cols["key"] = part, book.ledger.keys(part)
            cols["state"], cols["fsize"], cols["cpu"], cols["wall"] = FINISHED, 1700, 1.5, 1.6
            paths = [f"/scratch/droid1/{PANDA}/outputs/out.{r}.dat" for r in part.tolist()]
            book.done(1, ResultBatch(cols, paths, ["0a1b2c3d"] * len(part), [""] * len(part)))
        book.sent(rows)
    book.journal.close()


def parse_only(path: Path) -> float:
    """Reading the records (framing, checksums, JSON, arrays) without applying them."""
    t0 = time.perf_counter()
    for _ in read_records(path.read_bytes()):
        pass
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=1_000_000)
    args = p.parse_args()
    n = args.n

    per_range = ledger_memory(n)
    per_dict = dict_memory(min(n, 100_000))
    print(f"ledger memory at {n:,} ranges: {per_range:.1f} bytes/range (target < 64)")
    print(f"  baseline, a dict per range: {per_dict:.0f} bytes/range ({per_dict / per_range:.0f}x)")

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "journal"
        t0 = time.perf_counter()
        write_journal(path, n)
        write_s = time.perf_counter() - t0
        size = path.stat().st_size
        t0 = time.perf_counter()
        rep = replay(path, capacity=n)
        replay_s = time.perf_counter() - t0
        assert rep.ledger.count(State.FINISHED) == n and not rep.unsent
        parse_s = parse_only(path)
    print(
        f"journal of {n:,} range lives: {size / 1e6:.0f} MB, {rep.records:,} records,"
        f" written in {write_s:.1f} s ({n / write_s:,.0f} ranges/s)"
    )
    print(f"replay: {replay_s:.2f} s ({n / replay_s:,.0f} ranges/s)")
    print(
        f"  baseline, reading the records alone: {parse_s:.2f} s ({parse_s / replay_s:.0%} of replay)"
    )


if __name__ == "__main__":
    main()
