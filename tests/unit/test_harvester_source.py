"""Harvester as the event-range source of the single-node loop: many jobs, silence."""

from __future__ import annotations

import json
import sys
import threading

import pytest

from pilot.comm.harvester import HarvesterAccessPoint, HarvesterEventSource
from pilot.errors import ErrorCode, PilotError
from pilot.job import Job
from pilot.onenode import OneNode, run_event_service


def job_def(pid: int) -> dict:
    return {
        "PandaID": str(pid),
        "taskID": "3",
        "jobsetID": "2",
        "transformation": sys.executable,
        "jobPars": "-m pilot.payloads.toysim",
        "eventService": "True",
    }


def test_worker_jobs_follow_worker_pandaids(tmp_path):
    ap = HarvesterAccessPoint(tmp_path)
    (tmp_path / "HPCJobs.json").write_text(json.dumps({str(p): job_def(p) for p in (5, 6, 7)}))
    assert sorted(j.panda_id for j in ap.worker_jobs()) == [5, 6, 7]
    (tmp_path / "worker_pandaids.json").write_text("[7, 5]")
    assert [j.panda_id for j in ap.worker_jobs()] == [7, 5]
    (tmp_path / "worker_pandaids.json").write_text("[7, 8]")
    with pytest.raises(PilotError):
        ap.worker_jobs()


def test_event_requests_and_ranges_are_at_the_top_in_every_map_type(tmp_path):
    ap = HarvesterAccessPoint(tmp_path, map_type="ManyToOne")
    src = HarvesterEventSource(ap, block=30, first_delay=0.02)
    rng = {"eventRangeID": "3-6-1-1-0", "startEvent": 1, "lastEvent": 2, "LFN": "f", "GUID": "g"}

    def harvester():
        request = json.loads((tmp_path / "worker_requestevents.json").read_text())
        assert request["6"]["nRanges"] == 16
        (tmp_path / "JobsEventRanges.json").write_text(json.dumps({"6": [rng]}))

    t = threading.Timer(0.1, harvester)
    t.start()
    assert src.get_event_ranges(6, 2, 3, 4) == [rng]
    t.join()
    assert not (tmp_path / "6").exists()


def test_silent_harvester_ends_the_job_with_a_clear_error(tmp_path):
    ap = HarvesterAccessPoint(tmp_path)
    src = HarvesterEventSource(ap, wait_timeout=0.2, first_delay=0.05)
    job = Job.from_panda(job_def(9))
    s = run_event_service(job, tmp_path / "work", src, OneNode(max_source_failures=2))
    assert s.error is not None and s.error.code == ErrorCode.COMMUNICATIONFAILURE
    assert "no event ranges" in s.error.detail
    assert s.n_ranges == 0
