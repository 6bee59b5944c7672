"""The single-node event service (Yoda and one Droid in one process) against an
in-memory dispatcher."""

from __future__ import annotations

import sys
import threading
import time

import pytest

from pilot.errors import ErrorCode, PilotError
from pilot.eventservice.outputs import adler32_of
from pilot.job import Job
from pilot.onenode import JOURNAL, OneNode, run_event_service


class Dispatcher:
    """Plays PanDA's getEventRanges/updateEventRanges, checking the invariants."""

    def __init__(self, n: int, per_range: int = 5, down_updates: int = 0, down_gets: int = 0):
        self.todo = [
            {
                "eventRangeID": f"3-7-1-{i}-0",
                "startEvent": i * per_range + 1,
                "lastEvent": (i + 1) * per_range,
                "LFN": "EVNT.root",
                "GUID": "guid-1",
                "scope": "mc",
            }
            for i in range(n)
        ]
        self.dispatched: set[str] = set()
        self.updates: dict[str, dict] = {}
        self.duplicates: list[str] = []
        self.down_updates = down_updates
        self.down_gets = down_gets
        self.update_calls = 0

    def get_event_ranges(self, panda_id, jobset_id, task_id, n_ranges):
        assert (panda_id, jobset_id, task_id) == (7, 2, 3)
        if self.down_gets:
            self.down_gets -= 1
            raise PilotError(ErrorCode.COMMUNICATIONFAILURE, "getEventRanges: connection refused")
        out, self.todo = self.todo[:n_ranges], self.todo[n_ranges:]
        self.dispatched.update(r["eventRangeID"] for r in out)
        return out

    def update_event_ranges(self, entries, version=0):
        self.update_calls += 1
        if self.down_updates:
            self.down_updates -= 1
            raise PilotError(ErrorCode.COMMUNICATIONFAILURE, "updateEventRanges: timeout")
        answers = []
        for e in entries:
            rid = e["eventRangeID"]
            if rid in self.updates:
                self.duplicates.append(rid)
            self.updates[rid] = e
            answers.append(rid in self.dispatched)
        return answers


def make_job(pars: str) -> Job:
    return Job.from_panda(
        {
            "PandaID": 7,
            "taskID": 3,
            "jobsetID": 2,
            "transformation": sys.executable,
            "jobPars": "-m pilot.payloads.toysim " + pars,
            "eventService": "True",
        }
    )


def test_every_range_reported_once_with_outputs(tmp_path):
    d = Dispatcher(60)
    s = run_event_service(make_job(""), tmp_path, d, OneNode(batch_size=25, report_interval=0.5))
    assert s.error is None and s.error_code == 0
    assert s.n_finished == 60 and s.n_failed == s.n_fatal == 0
    assert s.n_events == 300 and s.n_delivered == 60 and s.n_undelivered == 0
    assert set(d.updates) == d.dispatched and not d.duplicates
    assert all(e["eventStatus"] == "finished" for e in d.updates.values())
    for r in s.results:
        assert adler32_of(r.output_path) == r.adler32


def test_crashing_payload_fails_chosen_ranges_and_finishes_the_rest(tmp_path):
    d = Dispatcher(30)
    job = make_job(
        "--crash-on-range-substring 3-7-1-7-0 --segfault-on-event 101 --fail-on-event 141"
    )
    s = run_event_service(job, tmp_path, d, OneNode(batch_size=10))
    assert s.error is None and s.restarts == 2
    failed = {rid for rid, e in d.updates.items() if e["eventStatus"] == "failed"}
    assert failed == {"3-7-1-7-0", "3-7-1-20-0", "3-7-1-28-0"}
    assert all(d.updates[rid]["errorCode"] == 1224 for rid in failed)
    assert s.n_finished == 27 and len(d.updates) == 30 and not d.duplicates


def test_upstream_down_then_back(tmp_path):
    d = Dispatcher(12, down_updates=2, down_gets=1)
    s = run_event_service(make_job(""), tmp_path, d, OneNode(batch_size=5, report_interval=0.0))
    assert s.n_finished == 12 and s.n_undelivered == 0
    assert set(d.updates) == d.dispatched and not d.duplicates


def test_upstream_never_back_keeps_results_for_later(tmp_path):
    d = Dispatcher(6, down_updates=10**6)
    s = run_event_service(make_job(""), tmp_path, d, OneNode(final_flush_timeout=0.0))
    assert s.n_finished == 6 and s.n_undelivered == 6 and not d.updates
    assert (tmp_path / JOURNAL).exists()
    d.down_updates = 0
    again = run_event_service(make_job(""), tmp_path, d)  # the same job, later: it resumes
    assert again.n_delivered == 6 and again.n_undelivered == 0 and again.n_finished == 6
    assert len(d.updates) == 6 and not d.duplicates


def test_no_ranges_at_all_is_esnoevents(tmp_path):
    d = Dispatcher(0)
    s = run_event_service(make_job(""), tmp_path, d)
    assert s.n_ranges == 0 and s.error_code == ErrorCode.ESNOEVENTS


def test_stop_releases_unfinished_ranges(tmp_path):
    d = Dispatcher(10)
    stop = threading.Event()
    timer = threading.Timer(1.0, stop.set)
    timer.start()
    t0 = time.monotonic()
    s = run_event_service(
        make_job("--hang-on-event 26"), tmp_path, d, OneNode(kill_grace=1.0), stop=stop
    )
    timer.cancel()
    assert time.monotonic() - t0 < 30
    assert s.n_finished == 5
    assert "3-7-1-5-0" in {r.event_range_id for r in s.released}
    assert set(d.updates) | {r.event_range_id for r in s.released} == d.dispatched
    assert not set(d.updates) & {r.event_range_id for r in s.released}


def test_stage_out_hook_can_fail_a_range(tmp_path):
    d = Dispatcher(4)

    def stage_out(result):
        if result.event_range_id == "3-7-1-2-0":
            raise PilotError(ErrorCode.STAGEOUTFAILED, "object store refused")
        result.output_path = "s3://bucket/" + result.output_path.rsplit("/", 1)[1]
        return result

    s = run_event_service(make_job(""), tmp_path, d, stage_out=stage_out)
    assert d.updates["3-7-1-2-0"]["eventStatus"] == "failed"
    assert d.updates["3-7-1-2-0"]["errorCode"] == ErrorCode.STAGEOUTFAILED
    assert s.n_finished == 3 and all(
        r.output_path.startswith("s3://") for r in s.results if r.status.value == "finished"
    )


def test_payload_that_cannot_start_is_a_clear_error(tmp_path):
    d = Dispatcher(3)
    job = Job.from_panda(
        {"PandaID": 7, "taskID": 3, "jobsetID": 2, "transformation": "/no/such/trf"}
    )
    s = run_event_service(job, tmp_path, d)
    assert s.error is not None and s.error.code == ErrorCode.TRANSFORMNOTFOUND
    assert s.n_ranges == 0 and not d.dispatched


def test_an_upstream_handing_out_the_same_ranges_again_ends_the_job(tmp_path):
    d = Dispatcher(3)
    first = list(d.todo)

    def same_again(panda_id, jobset_id, task_id, n_ranges):
        d.dispatched.update(r["eventRangeID"] for r in first)
        return first  # every call: the same three ranges

    d.get_event_ranges = same_again
    s = run_event_service(make_job(""), tmp_path, d)
    assert s.n_finished == 3 and len(d.updates) == 3 and not d.duplicates


def test_a_journal_of_another_job_is_refused(tmp_path):
    d = Dispatcher(2)
    assert run_event_service(make_job(""), tmp_path, d).n_finished == 2
    other = Job.from_panda({**make_job("").raw, "PandaID": 8})
    with pytest.raises(PilotError) as err:
        run_event_service(other, tmp_path, Dispatcher(2))
    assert err.value.code == ErrorCode.FILEEXISTS and "journal of job [7]" in err.value.detail
