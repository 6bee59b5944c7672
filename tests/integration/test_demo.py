"""``pilot demo`` end to end, small: real dispatcher, real mpiexec ranks (or the
single-node pilot), real toy payload; the report must agree with what the
dispatcher recorded."""

from __future__ import annotations

import json
import os
import shutil
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


def _demo(
    tmp_path: Path, *extra: str, path: str | None = None
) -> tuple[subprocess.CompletedProcess, dict, Path]:
    work = tmp_path / "demo"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    if path is not None:
        env["PATH"] = path
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


def test_demo_without_mpi_runs_the_single_node_pilot(tmp_path: Path) -> None:
    # a PATH without mpiexec: the demo says so and runs `pilot run --url` instead
    bare = "/usr/bin:/bin"
    mode = ["--mode", "single"] if shutil.which("mpiexec", path=bare) else []
    proc, report, work = _demo(tmp_path, "--ranges", "60", *mode, path=bare)
    assert report["mode"] == "single"
    if not mode:
        assert "MPI not available (no mpiexec on PATH)" in proc.stdout
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


def test_timeline_spans_from_a_journal(tmp_path: Path) -> None:
    import numpy as np

    from hpc.wire import ResultBatch
    from pilot.demo import read_journal_results
    from pilot.errors import PilotError
    from pilot.eventservice.model import RangeResult, RangeStatus
    from pilot.job import EventRange
    from pilot.timeline import draw_timeline, results_from_dump, spans_from_journal
    from yoda.journal import Book, Journal
    from yoda.ledger import Ledger

    out = tmp_path / "out.dat"
    out.write_bytes(b"x")
    os.utime(out, (1000.0, 1000.0))

    journal = tmp_path / "yoda.journal"
    book = Book(Ledger(), Journal(journal))
    book.epoch(1)
    job = book.add_job({"PandaID": 2, "taskID": 1})
    ids = [f"1-2-1-{i}-1" for i in range(1, 5)]
    rows = book.add_ranges(job, [EventRange(rid, i, i, "EVNT") for i, rid in enumerate(ids)])
    status = [RangeStatus.FINISHED, RangeStatus.FAILED, RangeStatus.FINISHED, RangeStatus.FATAL]
    for droid, i in ((1, 0), (2, 1), (2, 2), (3, 3)):
        book.lease(rows[i : i + 1], droid, 100.0)
        r = RangeResult(ids[i], status[i], str(out) if i == 0 else "", wall=2.0, cpu=1.5)
        keys = book.ledger.keys(rows[i : i + 1])
        book.done(droid, ResultBatch.from_results([(int(rows[i]), int(keys[0]), r)]))
    book.journal.close()
    with open(journal, "ab") as fh:
        fh.write(b"\x06\x00")  # a torn last record is skipped
    results = read_journal_results(journal)
    assert [(r.droid, r.range_id, r.status) for r in results] == [
        (1, ids[0], "finished"),
        (2, ids[1], "failed"),
        (2, ids[2], "finished"),
        (3, ids[3], "fatal"),
    ]
    assert np.isclose(results[0].wall, 2.0) and results[0].output_path == str(out)

    def res(rid: str, status: str, path: str = "", **extra: float) -> str:
        d = {"droid": 2, "event_range_id": rid, "status": status, "output_path": path}
        return json.dumps({**d, "wall": 2.0, "cpu": 1.5, **extra})

    dump = [
        res("1-2-1-1-1", "finished", str(out)),
        res("1-2-1-2-1", "failed"),
        res("1-2-1-3-1", "finished", started=5, ended=9),
        res("1-2-1-4-1", "fatal"),
    ]
    spans = {s.range_id: s for s in spans_from_journal(results_from_dump(dump), {ids[1]: 50.0})}
    assert (spans["1-2-1-1-1"].start, spans["1-2-1-1-1"].end) == (998.0, 1000.0)  # output mtime
    assert (spans["1-2-1-2-1"].start, spans["1-2-1-2-1"].end) == (48.0, 50.0)  # dispatcher time
    assert (spans["1-2-1-3-1"].start, spans["1-2-1-3-1"].end) == (5.0, 9.0)  # its own clock
    assert "1-2-1-4-1" not in spans  # no time known at all: left out, not invented
    assert spans["1-2-1-1-1"].lane == "droid 2"
    png = draw_timeline(list(spans.values()), tmp_path / "t.png")
    assert png.read_bytes()[:8] == PNG_MAGIC

    data = bytearray(journal.read_bytes())
    data[20] ^= 0xFF  # damage in the middle is corruption, not a torn tail
    journal.write_bytes(bytes(data))
    with pytest.raises(PilotError):
        read_journal_results(journal)
