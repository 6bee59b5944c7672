"""``pilot hpc`` under a real mpiexec (Open MPI, ULFM) against the embedded dispatcher."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.mpi.harness import invariant, load_task, mpiexec, wait
from tests.mpi.invariants import journal_outputs

pytestmark = [pytest.mark.mpi, pytest.mark.skipif(mpiexec() is None, reason="no mpiexec")]


def test_two_jobs_on_three_droids_every_range_once(server, launched, tmp_path):
    load_task(server, n_jobs=2, n_ranges=30, pars="--cpu-per-event 0.05")  # 3 s of CPU a job
    work = tmp_path / "work"
    work.mkdir()
    rc = wait(launched.start(server, work, "--monitor-interval", "1", jobs=2), timeout=120)
    problems, counts = invariant(server, work)
    assert problems == []
    assert counts == {"finished": 60}
    assert rc == 0
    jobs = server.store.jobs()
    assert len(jobs) == 2 and {j["status"] for j in jobs} == {"finished"}
    finals = [j["final"] if isinstance(j["final"], dict) else json.loads(j["final"]) for j in jobs]
    assert sorted(int(f["nEvents"]) for f in finals) == [60, 60]  # 30 ranges x 2 events
    # the droids' monitors' figures, merged per job (a Python payload: megabytes of RSS)
    for f in finals:
        assert int(f["maxRSS"]) > 1000 and 0 < int(f["avgRSS"]) <= int(f["maxRSS"]), f
        assert int(f["totRCHAR"]) > 0, f
    # each job its share of the droids' payload CPU: 3 s of events and its payloads' start,
    # not all of it (6 s of events and every start: 8 s here when each job was charged all)
    cpu = [int(f["cpuConsumptionTime"]) for f in finals]
    assert all(2 <= c <= 6 for c in cpu) and sum(cpu) >= 5, cpu
    # each output was stored (copy copytool, WORKDIR/storage) before its range was reported
    stored = journal_outputs(work / "yoda.journal")
    assert len(stored) == 60
    assert all(Path(path).is_relative_to(work / "storage") for path, _, _ in stored.values())


def test_thousands_of_quick_ranges_through_the_link_process(server, launched, tmp_path):
    """Quick ranges keep rank 0's upstream link busy both ways, so a getEventRanges answer
    often comes in while results go up. Droids waiting for those ranges were not served
    then, and every rank sat idle with ranges READY (a third to a half of the runs hung
    here before)."""
    load_task(server, n_jobs=1, n_ranges=3000)
    work = tmp_path / "work"
    work.mkdir()
    rc = wait(launched.start(server, work), timeout=90)
    problems, counts = invariant(server, work)
    assert problems == []
    assert counts == {"finished": 3000}
    assert rc == 0
