"""The guard rails inside Droids, under a real ``mpiexec -n 3`` (Yoda and two Droids).

A memory hog, a looping payload and a payload past the job's walltime are each killed
with their code (1235 / 1150 / 1213), their range fails with it, the other ranges
finish, and the invariant holds. Every payload process leaves a setsid'd orphan behind
on purpose (tests/payloads/orphan.py): none is alive once ``pilot hpc`` has ended, in
the event-service mode and in the whole-jobs (ManyToOne) mode.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from pilot.queue import QueueConfig
from tests.conftest import REPO, job_dict
from tests.mpi.harness import QUEUE, invariant, mpiexec, wait
from tests.mpi.test_mpi_harvester import run_hpc
from tests.payloads.orphan import survivors

pytestmark = [pytest.mark.mpi, pytest.mark.skipif(mpiexec() is None, reason="no mpiexec")]

ORPHAN = str(REPO / "tests" / "payloads" / "orphan.py")
GUARD_OPTIONS = ("--monitor-interval", "0.3", "--kill-grace", "2")


def run_task(server, launched, tmp_path: Path, toysim: str, queue=None, **job) -> dict:
    """One job of 10 ranges (events 0..19) whose payload leaves an orphan at each start;
    the ranges' final (status, error code), by first event."""
    marker = f"mpi-{tmp_path.name}"
    if queue:
        server.store.put_queue(QUEUE, {**QueueConfig.default(QUEUE).to_dict(), **queue})
    server.load_task(
        {
            "nJobs": 1,
            "nRanges": 10,
            "nEventsPerRange": 2,
            "job": {
                "transformation": sys.executable,
                "jobPars": f"{ORPHAN} {marker} -m pilot.payloads.toysim {toysim}",
                "computingSite": QUEUE,
                "coreCount": 1,
                **job,
            },
        }
    )
    work = tmp_path / "work"
    work.mkdir()
    rc = wait(launched.start(server, work, *GUARD_OPTIONS, n=3), timeout=150)
    logs = "".join(p.read_text()[-1500:] for p in sorted((work / "logs").glob("rank*.log")))
    problems, _ = invariant(server, work)
    assert problems == [], logs
    assert survivors(marker) == [], logs  # every payload process's orphan ended with it
    assert rc == 0, logs
    rows = server.store.query("SELECT start_event, status, error_code FROM ranges")
    return {r["start_event"]: (r["status"], r["error_code"]) for r in rows}


def failed(ranges: dict) -> dict:
    return {start: v for start, v in ranges.items() if v[0] != "finished"}


def test_memory_hog_in_a_droid_is_1235_and_the_droid_goes_on(server, launched, tmp_path):
    ranges = run_task(server, launched, tmp_path, "--hog-on-event 7", queue={"maxrss": 100})
    assert failed(ranges) == {6: ("failed", 1235)}  # the range of events 6-7
    assert len(ranges) == 10
    evidence = list((tmp_path / "work").rglob("monitor_evidence.txt"))
    assert len(evidence) == 1 and "1235 PAYLOADEXCEEDMAXMEM" in evidence[0].read_text()


def test_looping_payload_in_a_droid_is_1150_and_the_droid_goes_on(server, launched, tmp_path):
    ranges = run_task(server, launched, tmp_path, "--hang-on-event 7", queue={"looping_limit": 3})
    assert failed(ranges) == {6: ("failed", 1150)}


def test_payload_past_its_walltime_in_a_droid_is_1213(server, launched, tmp_path):
    ranges = run_task(server, launched, tmp_path, "--hang-on-event 19", maxWalltime=12)
    assert failed(ranges) == {18: ("failed", 1213)}  # the last range


def test_whole_jobs_of_a_many_to_one_worker_leave_no_payload_process(tmp_path: Path):
    behave = str(REPO / "tests" / "payloads" / "behave.py")
    marker = f"whole-{tmp_path.name}"
    ap = tmp_path / "ap"
    jobs = {pid: job_dict(pid, jobpars=f"{ORPHAN} {marker} {behave} sleep 0.5") for pid in (61, 62)}
    for pid, d in jobs.items():
        (ap / str(pid)).mkdir(parents=True)
        (ap / str(pid) / "HPCJobs.json").write_text(json.dumps({str(pid): d}))
    (ap / "worker_pandaids.json").write_text(json.dumps(list(jobs)))
    rc = run_hpc(tmp_path, ap, "--queue", "HPCQ", *GUARD_OPTIONS)
    assert rc == 0, (tmp_path / "mpiexec.log").read_text()[-3000:]
    attrs = {p: json.loads((ap / str(p) / "worker_attributes.json").read_text()) for p in jobs}
    assert [attrs[p]["jobStatus"] for p in jobs] == ["finished", "finished"]
    assert survivors(marker) == []
