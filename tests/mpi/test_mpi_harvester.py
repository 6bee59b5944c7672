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

pytestmark = [pytest.mark.mpi, pytest.mark.skipif(mpiexec() is None, reason="no mpiexec")]


def run_hpc(tmp_path: Path, ap: Path, *extra: str, timeout: float = 120) -> int:
    argv = mpi_argv(3) + [
        sys.executable,
        "-m",
        "hpc.roles",
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
