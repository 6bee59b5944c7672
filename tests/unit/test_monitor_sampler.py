"""The sampler on real process trees: columns, summaries, CPU of exited children."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psutil

from pilot.monitor.sampler import COLUMNS, Sampler, read_series
from pilot.payload.runner import PayloadProcess

PY = sys.executable


def test_cpu_of_exited_children_is_kept(tmp_path: Path) -> None:
    # Children burn CPU and exit between samples; the parent waits for a line on stdin.
    code = (
        "import os, sys\n"
        "for _ in range(3):\n"
        "    if os.fork() == 0:\n"
        "        sum(range(3_000_000)); os._exit(0)\n"
        "    os.wait()\n"
        "print('ready', flush=True); sys.stdin.readline()\n"
    )
    proc = subprocess.Popen([PY, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        root = psutil.Process(proc.pid)
        sampler = Sampler(lambda: [root], tmp_path / "series.txt")
        s = sampler.sample(now=1000)
        own = root.cpu_times()
        assert s.cpu >= own.children_user + own.children_system > 0
        assert s.nprocs == 1 and s.nthreads >= 1 and s.rss > 0 and s.pss > 0
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=20)
    # The root is gone: its figures stay in the totals.
    after = sampler.sample(now=1001)
    assert after.nprocs == 0 and after.rss == 0
    assert after.cpu >= s.cpu
    summary = sampler.summary()
    assert summary["cpuConsumptionTime"] == round(after.cpu)
    assert summary["maxRSS"] == s.rss and summary["avgRSS"] == s.rss // 2


def test_series_file_and_summaries(tmp_path: Path) -> None:
    payload = PayloadProcess(["sleep", "10"], cwd=tmp_path)
    try:
        sampler = Sampler(payload, tmp_path / "out.txt")
        for t in range(3):
            sampler.sample(now=2000 + t)
    finally:
        payload.kill_tree(1.0)
    lines = (tmp_path / "out.txt").read_text().splitlines()
    assert lines[0].split("\t") == list(COLUMNS)
    assert len(lines) == 4
    rows = read_series(tmp_path / "out.txt")
    assert [r.Time for r in rows] == [2000, 2001, 2002]
    assert rows[0].nprocs == 1
    prmon = sampler.prmon_summary()
    assert set(prmon) == {"Max", "Avg"} and prmon["Max"]["rss"] == max(r.rss for r in rows)
    metrics = sampler.job_metrics()
    assert "maxPSS=" in metrics and "readbyterate=" in metrics
    path = sampler.write_summary()
    assert path is not None and path.name == "memory_monitor_summary.json"


def test_half_written_series_line_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "s.txt"
    path.write_text("\t".join(COLUMNS) + "\n" + "\t".join(["1"] * 13) + "\n17\t5")
    assert len(read_series(path)) == 1


def test_empty_sampler_has_empty_summary() -> None:
    sampler = Sampler(lambda: [])
    assert sampler.summary() == {} and sampler.job_metrics() == ""
    assert sampler.write_summary() is None
