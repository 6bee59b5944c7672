"""``pilot hpc --harvester DIR`` under a real mpiexec, with Harvester's side played by a thread.

Harvester's own messenger drives the same runs in ``tests/integration/test_real_harvester.py``;
these run where it is absent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.mpi.fake_harvester import FakeHarvester
from tests.mpi.harness import kill_all, mpi_argv, mpiexec, wait
from tests.mpi.invariants import check
from yoda.journal import replay
from yoda.ledger import State

pytestmark = [pytest.mark.mpi, pytest.mark.skipif(mpiexec() is None, reason="no mpiexec")]


def run_hpc(tmp_path: Path, ap: Path, *extra: str, timeout: float = 120) -> int:
    argv = mpi_argv(3) + [
        sys.executable,
        "-m",
        "pilot.ranks",
        "--harvester",
        str(ap),
        "--workdir",
        str(tmp_path / "work"),
        "--hb-interval",
        "1",
        "--harvester-heartbeat",
        "1",
        *extra,
    ]
    log = open(tmp_path / "mpiexec.log", "wb")
    proc = subprocess.Popen(
        argv,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    try:
        return wait(proc, timeout)
    finally:
        if proc.poll() is None:
            kill_all(proc)


def test_one_to_one_event_service_job(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("PYTHON", sys.executable)
    ap = tmp_path / "ap"
    ap.mkdir()
    harvester = FakeHarvester(ap, 5001, 21).start()
    try:
        rc = run_hpc(tmp_path, ap)
    finally:
        harvester.stop()
    assert rc == 0, (tmp_path / "mpiexec.log").read_text()[-3000:]
    assert len(harvester.dispatched) == 21
    outputs = {
        e["eventRangeID"]: (e["path"], e["fsize"], e["chksum"])
        for e in harvester.dump
        if e["eventStatus"] == "finished"
    }
    assert check(harvester.dispatched, harvester.dump, outputs=outputs) == []
    assert len(outputs) == 21
    # rank 0 told Harvester the job's state at the top of the access point, and that
    # the worker is done; nothing went to a per-job directory Harvester never reads
    attrs = json.loads((ap / "worker_attributes.json").read_text())
    assert attrs["jobStatus"] == "finished" and int(attrs["nEvents"]) > 0
    assert (ap / "kill_worker.json").exists() and (ap / "worker_heartbeat.json").exists()
    assert not (ap / "5001").exists()


def test_event_service_job_in_a_many_to_one_worker_fails_at_once(tmp_path: Path):
    ap = tmp_path / "ap"
    (ap / "5002").mkdir(parents=True)
    job = {"PandaID": 5002, "transformation": sys.executable, "eventService": "True"}
    (ap / "5002" / "HPCJobs.json").write_text(json.dumps({"5002": job}))
    (ap / "worker_pandaids.json").write_text("[5002]")
    run_hpc(tmp_path, ap, timeout=60)
    attrs = json.loads((ap / "5002" / "worker_attributes.json").read_text())
    assert attrs["jobStatus"] == "failed" and attrs["pilotErrorCode"] == 1341
    assert "ManyToOne" in attrs["pilotErrorDiag"]
    assert (ap / "kill_worker.json").exists()


def test_many_to_one_three_ordinary_jobs_on_two_droid_ranks(tmp_path: Path):
    from tests.conftest import REPO, job_dict

    behave = str(REPO / "tests" / "payloads" / "behave.py")
    ap = tmp_path / "ap"
    jobs = {
        5101: job_dict(5101, jobpars=f"{behave} write a.dat 700", outFiles="a.dat,log.5101.tgz"),
        5102: job_dict(5102, jobpars=f"{behave} exit 4 broken"),
        5103: job_dict(5103, jobpars=f"{behave} sleep 1"),
    }
    for pid, d in jobs.items():
        (ap / str(pid)).mkdir(parents=True)
        (ap / str(pid) / "HPCJobs.json").write_text(json.dumps({str(pid): d}))
    (ap / "worker_pandaids.json").write_text(json.dumps(list(jobs)))
    rc = run_hpc(tmp_path, ap, "--queue", "HPCQ")
    assert rc == 1, (tmp_path / "mpiexec.log").read_text()[-3000:]  # one job failed
    attrs = {p: json.loads((ap / str(p) / "worker_attributes.json").read_text()) for p in jobs}
    assert [attrs[p]["jobStatus"] for p in jobs] == ["finished", "failed", "finished"]
    assert attrs[5102]["transExitCode"] == 4 and attrs[5102]["pilotErrorCode"] > 0
    for pid, a in attrs.items():
        # reported as pilot run reports: node, times in PanDA's format, cores, report, log
        assert a["node"] and a["siteName"] == "HPCQ" and a["coreCount"] == 1
        assert len(a["startTime"]) == len(a["endTime"]) == len("2026-12-01 22:00:00")
        assert json.loads((ap / str(pid) / "jobReport.json").read_text())["PandaID"] == pid
        dump = json.loads((ap / str(pid) / "event_status.dump.json").read_text())[str(pid)]
        log_entry = next(e for e in dump if e["type"] == "log")
        assert Path(log_entry["path"]).parent == ap / str(pid) / f"PandaJob_{pid}"
    assert (ap / "kill_worker.json").exists() and (ap / "worker_heartbeat.json").exists()


def test_a_payload_that_fails_everywhere_ends_the_job(tmp_path: Path, monkeypatch):
    """The payload cannot start at all: its droid gives the ranges back, each return
    costs an attempt, so they fail after Yoda's tries instead of bouncing until the
    walltime; the job ends failed, every range reported once, the worker done."""
    monkeypatch.setenv("PYTHON", sys.executable)
    ap = tmp_path / "ap"
    ap.mkdir()
    harvester = FakeHarvester(ap, 5201, 6, pars="--no-such-option").start()
    try:
        rc = run_hpc(tmp_path, ap, timeout=150)
    finally:
        harvester.stop()
    log = (tmp_path / "mpiexec.log").read_text()[-3000:]
    assert rc == 0, log
    # Each range ends failed, or, if the last droid gave up while it waited for its
    # next try, released: never reported, never leased, handed out again by PanDA.
    led = replay(tmp_path / "work" / "yoda.journal").ledger
    assert led.count(State.LEASED) == 0, log
    released = {led.range_id(r) for r in range(led.n) if led.state(r) is State.READY}
    reported = [e["eventRangeID"] for e in harvester.dump]
    assert len(reported) == len(set(reported)) and not released & set(reported)
    assert sorted([*reported, *released]) == sorted(harvester.dispatched)
    assert reported and all(e["eventStatus"] == "failed" for e in harvester.dump)
    attrs = json.loads((ap / "worker_attributes.json").read_text())
    assert attrs["jobStatus"] == "failed" and attrs["pilotErrorCode"] == 1224
    assert (ap / "kill_worker.json").exists()


def test_a_drained_worker_leaves_the_job_final(tmp_path: Path, monkeypatch):
    """SIGUSR1 (which mpiexec passes to every rank) drains the worker mid-run: the ranges
    that ran are reported once, the job gets its final state (Harvester would otherwise
    see it running in a worker that is gone), and the worker is done."""
    import signal
    import time

    monkeypatch.setenv("PYTHON", sys.executable)
    ap = tmp_path / "ap"
    ap.mkdir()
    harvester = FakeHarvester(ap, 5301, 400, pars="--cpu-per-event 0.02").start()
    argv = mpi_argv(3) + [
        sys.executable, "-m", "pilot.ranks", "--harvester", str(ap),
        "--workdir", str(tmp_path / "work"), "--hb-interval", "1",
        "--harvester-heartbeat", "1", "--term-grace", "10",
    ]  # fmt: skip
    log = open(tmp_path / "mpiexec.log", "wb")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        for _ in range(600):  # bounded: until some ranges reached Harvester
            if len(harvester.dump) >= 10 or proc.poll() is not None:
                break
            time.sleep(0.1)
        proc.send_signal(signal.SIGUSR1)
        rc = wait(proc, 90)
    finally:
        if proc.poll() is None:
            kill_all(proc)
        harvester.stop()
    assert rc == 0, (tmp_path / "mpiexec.log").read_text()[-3000:]
    done = [e["eventRangeID"] for e in harvester.dump]
    assert len(done) == len(set(done)) and 10 <= len(done) < 400
    assert all(e["eventStatus"] == "finished" for e in harvester.dump)
    attrs = json.loads((ap / "worker_attributes.json").read_text())
    assert attrs["jobStatus"] == "finished" and attrs["nEvents"] == 5 * len(done)
    assert (ap / "kill_worker.json").exists()


def test_many_to_one_drain_leaves_every_job_final(tmp_path: Path):
    """SIGUSR1 to a ManyToOne worker: the running jobs stop with the signal's code, the
    ones not started fail with it too (PanDA gives them to another worker), each in its
    own attributes, and the worker is done."""
    import signal
    import time

    from tests.conftest import REPO, job_dict

    behave = str(REPO / "tests" / "payloads" / "behave.py")
    ap = tmp_path / "ap"
    jobs = {pid: job_dict(pid, jobpars=f"{behave} sleep 30") for pid in (5401, 5402, 5403, 5404)}
    for pid, d in jobs.items():
        (ap / str(pid)).mkdir(parents=True)
        (ap / str(pid) / "HPCJobs.json").write_text(json.dumps({str(pid): d}))
    (ap / "worker_pandaids.json").write_text(json.dumps(list(jobs)))
    argv = mpi_argv(3) + [
        sys.executable, "-m", "pilot.ranks", "--harvester", str(ap),
        "--workdir", str(tmp_path / "work"), "--harvester-heartbeat", "1",
    ]  # fmt: skip
    log = open(tmp_path / "mpiexec.log", "wb")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        for _ in range(600):  # bounded: until two payloads run
            running = [p for p in jobs if (ap / str(p) / f"PandaJob_{p}" / "payload.sh").exists()]
            if len(running) >= 2 or proc.poll() is not None:
                break
            time.sleep(0.1)
        time.sleep(1.0)
        proc.send_signal(signal.SIGUSR1)
        rc = wait(proc, 90)
    finally:
        if proc.poll() is None:
            kill_all(proc)
    assert rc == 1, (tmp_path / "mpiexec.log").read_text()[-3000:]
    attrs = {p: json.loads((ap / str(p) / "worker_attributes.json").read_text()) for p in jobs}
    assert all(a["jobStatus"] == "failed" for a in attrs.values()), attrs
    assert {a["pilotErrorCode"] for a in attrs.values()} == {1207}  # SIGUSR1
    started = [p for p in jobs if (ap / str(p) / f"PandaJob_{p}").exists()]
    assert len(started) == 2
    assert (ap / "kill_worker.json").exists()


def test_one_to_one_ordinary_job(tmp_path: Path):
    """A OneToOne worker with an ordinary job: one rank runs it whole, files at the top."""
    from tests.conftest import REPO, job_dict

    behave = str(REPO / "tests" / "payloads" / "behave.py")
    ap = tmp_path / "ap"
    ap.mkdir()
    d = job_dict(5501, jobpars=f"{behave} write c.dat 300", outFiles="c.dat,log.5501.tgz")
    (ap / "HPCJobs.json").write_text(json.dumps({"5501": d}))
    (ap / "worker_pandaids.json").write_text("[5501]")
    rc = run_hpc(tmp_path, ap, timeout=90)
    assert rc == 0, (tmp_path / "mpiexec.log").read_text()[-3000:]
    attrs = json.loads((ap / "worker_attributes.json").read_text())
    assert attrs["jobStatus"] == "finished" and attrs["pilotErrorCode"] == 0
    dump = json.loads((ap / "event_status.dump.json").read_text())["5501"]
    assert {e["type"] for e in dump} == {"output", "log"}
    assert (ap / "jobReport.json").exists() and (ap / "kill_worker.json").exists()
    assert not (ap / "5501").exists()
