"""Dispatcher throughput: getEventRanges and updateEventRanges in batches of 100.

The dispatcher runs as ``pilot serve`` does, in its own process, so that its
CPU time can be read from /proc (psutil) apart from the client's. Printed:
ranges per second over HTTP and server CPU per range, next to two baselines
measured in the same run on the same machine:

- raw SQLite: the same dispatch/update statements, batches of 100 per
  transaction, no HTTP (what the store alone costs);
- a no-op HTTP round trip (``/healthz``) through waitress (what HTTP alone costs).

Usage: ``python benchmarks/bench_dispatcher.py [--ranges 20000] [--batch 100]``
"""

from __future__ import annotations

import argparse
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import requests

from pilot.comm.panda import PandaClient
from pilot.server import loading
from pilot.server.db import Store


def start_server(workdir: Path, db: Path) -> tuple[subprocess.Popen, str]:
    url_file = workdir / "url"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from pilot.server.serve import serve_main; sys.exit(serve_main())",
            "--db", str(db), "--port", "0", "--token", "bench", "--url-file", str(url_file),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    delay = 0.02
    for _ in range(60):
        if url_file.is_file() and url_file.read_text().strip():
            return proc, url_file.read_text().strip()
        time.sleep(delay)
        delay = min(delay * 2, 0.5)
    proc.kill()
    raise SystemExit("server did not start")


def server_cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def bench_sqlite(workdir: Path, n: int, batch: int) -> tuple[float, float]:
    """Raw store cost: dispatch + update of n ranges, batch per transaction (ranges/s each)."""
    store = Store(workdir / "raw.db")
    (pid,) = loading.load_task(store, {"job": {"transformation": "x"}, "nRanges": n})["PandaIDs"]
    store.dispatch_job("Q", "n")
    t0 = time.perf_counter()
    ids: list[str] = []
    while True:
        got = store.dispatch_ranges(pid, batch)
        if not got:
            break
        ids.extend(r["eventRangeID"] for r in got)
    t1 = time.perf_counter()
    for i in range(0, len(ids), batch):
        store.update_ranges(
            [{"eventRangeID": r, "eventStatus": "finished"} for r in ids[i : i + batch]]
        )
    t2 = time.perf_counter()
    store.close()
    # plain SQLite inserts, batch per transaction: the floor of any SQLite store
    conn = sqlite3.connect(workdir / "plain.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("CREATE TABLE t (id TEXT PRIMARY KEY, status TEXT)")
    t3 = time.perf_counter()
    for i in range(0, n, batch):
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO t VALUES (?, 'ready')", [(f"r{j}",) for j in range(i, min(n, i + batch))]
        )
        conn.execute("COMMIT")
    t4 = time.perf_counter()
    conn.close()
    print(f"baseline plain SQLite insert, {batch}/tx: {n / (t4 - t3):10.0f} rows/s")
    return n / (t1 - t0), n / (t2 - t1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ranges", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--noop-calls", type=int, default=1000)
    args = parser.parse_args(argv)
    n, batch = args.ranges, args.batch
    with tempfile.TemporaryDirectory(prefix="bench-dispatcher-") as tmp:
        workdir = Path(tmp)
        raw_get, raw_update = bench_sqlite(workdir, n, batch)
        print(f"baseline store dispatch (no HTTP):        {raw_get:10.0f} ranges/s")
        print(f"baseline store update   (no HTTP):        {raw_update:10.0f} ranges/s")

        db = workdir / "server.db"
        store = Store(db)
        task = {"job": {"transformation": "x"}, "nRanges": n}
        (pid,) = loading.load_task(store, task)["PandaIDs"]
        store.close()
        proc, url = start_server(workdir, db)
        try:
            server = psutil.Process(proc.pid)
            session = requests.Session()
            c0, t0 = server_cpu(server), time.perf_counter()
            for _ in range(args.noop_calls):
                session.get(f"{url}/healthz", timeout=30).raise_for_status()
            t1, c1 = time.perf_counter(), server_cpu(server)
            noop_rate = args.noop_calls / (t1 - t0)
            noop_cpu = (c1 - c0) / args.noop_calls
            print(
                f"baseline no-op HTTP round trip:           {noop_rate:10.0f} calls/s,"
                f" server CPU {noop_cpu * 1e3:.3f} ms/call"
            )

            client = PandaClient(url, token="bench", retries=0)
            assert client.get_job("Q") is not None
            ids: list[str] = []
            calls = 0
            c0, t0 = server_cpu(server), time.perf_counter()
            while True:
                got = client.get_event_ranges(pid, 0, 0, batch)
                calls += 1
                if not got:
                    break
                ids.extend(r["eventRangeID"] for r in got)
            t1, c1 = time.perf_counter(), server_cpu(server)
            assert len(ids) == n, len(ids)
            get_rate, get_cpu = n / (t1 - t0), (c1 - c0) / n
            print(
                f"getEventRanges    batch {batch}: {calls:5d} calls, {get_rate:10.0f} ranges/s,"
                f" server CPU {get_cpu * 1e6:7.1f} us/range ({(c1 - c0) / calls * 1e3:.2f} ms/call)"
            )
            calls = 0
            c0, t0 = server_cpu(server), time.perf_counter()
            for i in range(0, n, batch):
                entries = [
                    {"eventRangeID": r, "eventStatus": "finished", "cpuConsumptionTime": 1.0}
                    for r in ids[i : i + batch]
                ]
                assert all(client.update_event_ranges(entries))
                calls += 1
            t1, c1 = time.perf_counter(), server_cpu(server)
            up_rate, up_cpu = n / (t1 - t0), (c1 - c0) / n
            print(
                f"updateEventRanges batch {batch}: {calls:5d} calls, {up_rate:10.0f} ranges/s,"
                f" server CPU {up_cpu * 1e6:7.1f} us/range ({(c1 - c0) / calls * 1e3:.2f} ms/call)"
            )
            print(
                f"HTTP share of a {batch}-range call: getEventRanges"
                f" {noop_cpu / (get_cpu * batch):.0%}, updateEventRanges"
                f" {noop_cpu / (up_cpu * batch):.0%} of server CPU"
            )
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
