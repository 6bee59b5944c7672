"""``pilot hpc --harvester DIR`` under a real mpiexec, with Harvester's side played by a thread."""

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


def test_two_jobs_through_the_access_point(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("PYTHON", sys.executable)
    ap = tmp_path / "ap"
    ap.mkdir()
    harvester = FakeHarvester(ap, {5001: 12, 5002: 9}).start()
    work = tmp_path / "work"
    argv = mpi_argv(3) + [
        sys.executable,
        "-m",
        "hpc.roles",
        "--harvester",
        str(ap),
        "--workdir",
        str(work),
        "--hb-interval",
        "1",
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
        rc = wait(proc, 120)
    finally:
        if proc.poll() is None:
            kill_all(proc)
        harvester.stop()
    assert rc == 0
    assert len(harvester.dispatched) == 21
    outputs = {
        e["eventRangeID"]: (e["path"], e["fsize"], e["chksum"])
        for e in harvester.dump
        if e["eventStatus"] == "finished"
    }
    assert check(harvester.dispatched, harvester.dump, outputs=outputs) == []
    assert len(outputs) == 21
    # rank 0 told Harvester each job's state, and that the worker is done
    for panda_id in (5001, 5002):
        attrs = json.loads((ap / str(panda_id) / "worker_attributes.json").read_text())
        assert attrs["jobStatus"] == "finished" and int(attrs["nEvents"]) > 0
    assert (ap / "kill_worker.json").exists()
