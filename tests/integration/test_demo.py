"""``pilot demo`` end to end, small: real dispatcher, real mpiexec ranks (or the
single-node pilot), real toy payload; the report must agree with what the
dispatcher recorded."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from pilot.demo import mpi_unavailable

# The demo's subprocesses import the code under test, not an installed copy.
REPO = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _demo(tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess, dict, Path]:
    work = tmp_path / "demo"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-m", "pilot.demo", "--workdir", str(work), "--cpu-per-event", "0"]
        + list(extra),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=str(tmp_path),
        env=env,
        check=False,
    )
    report_path = work / "demo-report.json"
    assert report_path.is_file(), proc.stdout + proc.stderr
    return proc, json.loads(report_path.read_text()), work


def _dispatcher(work: Path) -> tuple[Counter, dict[str, int], int]:
    """Range statuses, accepted terminal updates per range, final job records."""
    conn = sqlite3.connect(work / "dispatcher.db")
    try:
        statuses = Counter(s for (s,) in conn.execute("SELECT status FROM ranges"))
        updates = dict(
            conn.execute(
                "SELECT range_id, COUNT(*) FROM range_updates WHERE accepted = 1"
                " AND status IN ('finished', 'failed', 'fatal') GROUP BY range_id"
            ).fetchall()
        )
        finals = conn.execute(
            "SELECT COUNT(*) FROM updates WHERE disposition = 'recorded'"
            " AND state IN ('finished', 'failed', 'closed', 'cancelled')"
        ).fetchone()[0]
    finally:
        conn.close()
    return statuses, updates, finals


def _check_outputs(proc, report: dict, work: Path, n: int) -> None:
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "summary" in out
    for word in ("finished", "ranges/s", "CPU efficiency", "wall time"):
        assert word in out
    assert str(work / "timeline.png") in out and str(work / "demo-report.json") in out
    png = work / "timeline.png"
    data = png.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000

    statuses, updates, finals = _dispatcher(work)
    assert report["counts"] == dict(statuses) == {"finished": n}
    assert len(updates) == n and set(updates.values()) == {1}
    assert report["reported_twice"] == []
    assert len(report["final_records"]) == finals
    assert report["task"]["ranges"] == n
    assert report["ranges_per_s"] > 0
    lanes = report["per_droid"]
    assert sum(d["finished"] for d in lanes.values()) == n


@pytest.mark.mpi
@pytest.mark.skipif(mpi_unavailable() is not None, reason=f"no MPI: {mpi_unavailable()}")
def test_demo_mpi_every_range_once(tmp_path: Path) -> None:
    proc, report, work = _demo(tmp_path, "--ranges", "200", "--ranks", "4")
    assert report["mode"] == "mpi" and report["droids"] == 3
    _check_outputs(proc, report, work, 200)
    assert set(report["per_droid"]) <= {"droid 1", "droid 2", "droid 3"}
    assert (work / "hpc" / "yoda.journal").is_file()
    assert [r["state"] for r in report["final_records"]] == ["finished"]


def test_demo_single_node(tmp_path: Path) -> None:
    proc, report, work = _demo(tmp_path, "--ranges", "60", "--mode", "single")
    assert report["mode"] == "single"
    _check_outputs(proc, report, work, 60)
    assert [r["state"] for r in report["final_records"]] == ["finished"]


def test_demo_bad_usage(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pilot.demo", "--ranks", "1", "--workdir", str(tmp_path / "w")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(tmp_path),
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        check=False,
    )
    assert proc.returncode == 2
    assert "--ranks" in proc.stdout


def test_demo_refuses_a_used_workdir(tmp_path: Path) -> None:
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "dispatcher.db").write_bytes(b"")
    proc = subprocess.run(
        [sys.executable, "-m", "pilot.demo", "--workdir", str(tmp_path / "w")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(tmp_path),
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        check=False,
    )
    assert proc.returncode == 2
    assert "earlier run" in proc.stdout
