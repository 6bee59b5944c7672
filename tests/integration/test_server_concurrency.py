"""8 concurrent clients send 1,000 updateEventRanges calls each: none lost, none doubled.

The dispatcher runs as ``pilot serve`` would, in its own process (waitress
threads, SQLite WAL); the clients are threads of this process, each with its
own job. Every tenth call also repeats an earlier range, which must be
refused, so doubling would show as a True where a False is due.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pilot.comm.panda import PandaClient
from pilot.server.db import Store

N_CLIENTS = 8
N_CALLS = 1000


def _start_server(tmp_path: Path) -> tuple[subprocess.Popen, str]:
    url_file = tmp_path / "url"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from pilot.server.serve import serve_main; sys.exit(serve_main())",
            "--db",
            str(tmp_path / "server.db"),
            "--port",
            "0",
            "--token",
            "tok",
            "--url-file",
            str(url_file),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    delay = 0.02
    for _ in range(60):  # bounded wait with backoff
        if url_file.is_file() and url_file.read_text().strip():
            return proc, url_file.read_text().strip()
        if proc.poll() is not None:
            raise RuntimeError(proc.stderr.read().decode())
        time.sleep(delay)
        delay = min(delay * 2, 0.5)
    proc.kill()
    raise RuntimeError("server did not start")


@pytest.fixture
def served(tmp_path: Path):
    db = tmp_path / "server.db"
    store = Store(db)
    from pilot.server import loading

    task = loading.load_task(
        store, {"job": {"transformation": "x"}, "nJobs": N_CLIENTS, "nRanges": N_CALLS}
    )
    store.close()
    proc, url = _start_server(tmp_path)
    yield url, task["PandaIDs"], db
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def test_concurrent_range_updates(served) -> None:
    url, panda_ids, db = served
    results: dict[int, tuple[int, int]] = {}
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            client = PandaClient(url, token="tok", retries=2, backoff=0.05)
            job = client.get_job("Q")
            pid = int(job["PandaID"])
            ranges = client.get_event_ranges(pid, 0, 0, N_CALLS)
            accepted = refused = 0
            for i, r in enumerate(ranges):
                status = "finished" if i % 7 else "failed"
                entries = [{"eventRangeID": r["eventRangeID"], "eventStatus": status}]
                if i % 10 == 9:  # repeat an earlier range: must be refused
                    entries.append(
                        {"eventRangeID": ranges[i - 5]["eventRangeID"], "eventStatus": "finished"}
                    )
                returns = client.update_event_ranges(entries)
                accepted += returns[0]
                if len(returns) > 1:
                    refused += not returns[1]
            results[pid] = (accepted, refused)
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(N_CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert sorted(results) == sorted(panda_ids)
    assert all(v == (N_CALLS, N_CALLS // 10) for v in results.values()), results
    store = Store(db)
    try:
        counts = store.range_update_counts()
        assert len(counts) == N_CLIENTS * N_CALLS and set(counts.values()) == {1}
        total = store.range_counts()
        assert total == {"finished": N_CLIENTS * (N_CALLS - 143), "failed": N_CLIENTS * 143}
    finally:
        store.close()
