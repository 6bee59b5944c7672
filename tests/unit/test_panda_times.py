"""Times go to PanDA (and through Harvester to PanDA) in the one format it parses."""

from __future__ import annotations

import time
from pathlib import Path

from pilot.comm.pandaapi import PANDA_TIME, epoch_of, panda_time, to_v1
from pilot.job import Job
from pilot.report import JobResult, final_update_fields
from tests.conftest import job_dict


def test_final_update_times_are_what_the_server_parses(tmp_path: Path) -> None:
    job = Job.from_panda(job_dict(7, jobpars="x"))
    result = JobResult(job, tmp_path, state="finished", start_time=1764600000.75)
    result.end_time = 1764600061.2
    fields = final_update_fields(result, "Q", "node", "pilot-1")
    # the server: time.strptime(value, "%Y-%m-%d %H:%M:%S"); anything else is dropped
    assert fields["startTime"] == "2025-12-01 14:40:00"
    assert fields["endTime"] == "2025-12-01 14:41:01"
    for key in ("startTime", "endTime"):
        time.strptime(fields[key], "%Y-%m-%d %H:%M:%S")


def test_panda_time_is_utc_whatever_the_local_zone() -> None:
    assert panda_time(0) == "1970-01-01 00:00:00"
    assert epoch_of("1970-01-01 00:01:40") == 100.0
    assert epoch_of(12.5) == 12.5 and epoch_of("12.5") == 12.5
    assert epoch_of(panda_time(1764600000)) == 1764600000


def test_epoch_seconds_from_an_older_spool_are_converted_for_v1() -> None:
    _, params, _ = to_v1(
        "updateJob", {"jobId": 1, "state": "finished", "startTime": 0.5, "endTime": "61"}
    )
    assert params["start_time"] == "1970-01-01 00:00:00"
    assert params["end_time"] == "1970-01-01 00:01:01"
    time.strptime(params["end_time"], PANDA_TIME)
