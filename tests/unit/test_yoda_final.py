"""Rank 0's final update of an event-service job to a PanDA server (``FinalReport``)."""

from __future__ import annotations

import json
import time
import zlib
from pathlib import Path

from pilot.comm.pandaapi import PANDA_TIME
from pilot.errors import ErrorCode
from pilot.ranks import build_parser
from yoda.rank import FinalReport

JOB = {
    "PandaID": 77,
    "jobsetID": 7,
    "taskID": 7,
    "transformation": "toysim",
    "eventService": "True",
    "logFile": "log.77.tgz",
    "outFiles": "log.77.tgz",
    "scopeLog": "user.pilot",
    "attemptNr": 2,
}


def report(tmp_path: Path, *extra: str) -> FinalReport:
    work = tmp_path / "work"
    (work / "logs").mkdir(parents=True)
    (work / "logs" / "rank0.log").write_text("rank0 INFO yoda.master: Yoda done\n")
    args = build_parser().parse_args(
        ["--url", "http://127.0.0.1:1", "--queue", "Q", "--workdir", str(work), *extra]
    )
    return FinalReport(args, {77: JOB})


def test_a_final_state_carries_pilot_runs_fields_and_the_stored_log(tmp_path):
    fields = report(tmp_path).panda_update(
        {"jobId": 77, "state": "finished", "nEvents": 8, "attemptNr": "2"}
    )
    assert fields["state"] == "finished" and fields["nEvents"] == 8 and fields["attemptNr"] == 2
    for key in ("startTime", "endTime"):
        time.strptime(fields[key], PANDA_TIME)  # PanDA drops any other format
    assert fields["siteName"] == "Q" and fields["node"] and fields["pilotID"]
    assert fields["cpuConsumptionUnit"] == "s" and fields["pilotErrorCode"] == 0
    entry = json.loads(fields["xml"])["log.77.tgz"]
    stored = tmp_path / "work" / "storage"
    (copy,) = [p for p in stored.rglob("log.77.tgz")]
    assert entry["fsize"] == copy.stat().st_size > 0
    assert entry["adler32"] == f"{zlib.adler32(copy.read_bytes()) & 0xFFFFFFFF:08x}"
    assert len(entry["guid"]) == 36 and entry["surl"]
    assert json.loads(fields["metaData"])["PandaID"] == 77


def test_a_log_that_cannot_be_stored_fails_the_job_with_its_code(tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    fields = report(tmp_path, "--output-url", str(blocker / "storage")).panda_update(
        {"jobId": 77, "state": "finished", "nEvents": 8}
    )
    assert fields["state"] == "failed" and "xml" not in fields
    assert fields["pilotErrorCode"] == ErrorCode.STAGEOUTFAILED, fields["pilotErrorDiag"]


def test_a_running_heartbeat_goes_as_it_is(tmp_path):
    beat = {"jobId": 77, "state": "running"}
    assert report(tmp_path).panda_update(dict(beat)) == beat
    assert not (tmp_path / "work" / "log.77.tgz").exists()


def test_a_log_that_cannot_be_made_fails_the_job_with_its_code(tmp_path):
    r = report(tmp_path)
    (tmp_path / "work" / "log.77.tgz").mkdir()  # where the tarball must go
    fields = r.panda_update({"jobId": 77, "state": "finished", "nEvents": 8})
    assert fields["state"] == "failed" and "xml" not in fields
    assert fields["pilotErrorCode"] == ErrorCode.LOGFILECREATIONFAILURE
