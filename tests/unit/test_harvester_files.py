"""Harvester's access-point files: names, layout, reading, the rename protocol."""

from __future__ import annotations

import json
import threading

import pytest

from pilot.comm.harvester import (
    PER_JOB_FILES,
    HarvesterAccessPoint,
    HarvesterEventSource,
    HarvesterFiles,
    HarvesterUpstream,
)
from pilot.errors import ErrorCode, PilotError
from pilot.eventservice.model import RangeResult, RangeStatus
from pilot.job import Job

JOB = {"PandaID": "11", "transformation": "/bin/true", "taskID": "3", "jobsetID": "2"}


def test_default_names_are_harvesters():
    f = HarvesterFiles()
    assert f.job_request == "worker_requestjob.json"
    assert f.job_spec == "HPCJobs.json"
    assert f.job_spec_alt == "pandaJobData.out"
    assert f.pandaids == "worker_pandaids.json"
    assert f.pool_file_catalog == "PoolFileCatalog_H.xml"
    assert f.event_request == "worker_requestevents.json"
    assert f.event_ranges == "JobsEventRanges.json"
    assert f.event_status_dump == "event_status.dump.json"
    assert f.update_events == "worker_updateevents.json"
    assert f.worker_attributes == "worker_attributes.json"
    assert f.job_report == "jobReport.json"
    assert f.heartbeat == "worker_heartbeat.json"
    assert f.kill_worker == "kill_worker.json"


def test_names_can_be_overridden(tmp_path):
    files = HarvesterFiles.with_overrides({"kill_worker": "kill_me.json"})
    assert HarvesterAccessPoint(tmp_path, files).path("kill_worker") == tmp_path / "kill_me.json"
    with pytest.raises(PilotError):
        HarvesterFiles.with_overrides({"nonsense": "x"})


def test_many_jobs_layout(tmp_path):
    ap = HarvesterAccessPoint(tmp_path, many_jobs=True)
    assert ap.path("event_ranges", 11) == tmp_path / "11" / "JobsEventRanges.json"
    assert ap.path("job_spec") == tmp_path / "HPCJobs.json"
    assert ap.path("kill_worker") == tmp_path / "kill_worker.json"
    assert "jobReport.json" not in PER_JOB_FILES and "job_report" in PER_JOB_FILES
    with pytest.raises(PilotError):
        ap.path("worker_attributes")


def test_read_many_jobs_and_the_alternative_name(tmp_path):
    ap = HarvesterAccessPoint(tmp_path)
    with pytest.raises(PilotError) as err:
        ap.read_jobs()
    assert err.value.code == ErrorCode.NOSUCHFILE
    (tmp_path / "pandaJobData.out").write_text(json.dumps(JOB))
    assert [j.panda_id for j in ap.read_jobs()] == [11]
    jobs = {str(i): {**JOB, "PandaID": str(i)} for i in (21, 22, 23)}
    (tmp_path / "HPCJobs.json").write_text(json.dumps(jobs))
    assert sorted(j.panda_id for j in ap.read_jobs()) == [21, 22, 23]


@pytest.mark.parametrize("text", ['{"11": {"PandaID": 1', "[1, 2]", '{"x": {}}', "\x00\xff"])
def test_garbage_job_spec_is_a_clear_error(tmp_path, text):
    (tmp_path / "HPCJobs.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(PilotError) as err:
        HarvesterAccessPoint(tmp_path).read_jobs()
    assert err.value.code in (ErrorCode.CONVERSIONFAILURE, ErrorCode.FILEHANDLINGFAILURE)


def test_pandaids(tmp_path):
    ap = HarvesterAccessPoint(tmp_path)
    (tmp_path / "worker_pandaids.json").write_text("[1, 2, 3]")
    assert ap.read_pandaids() == [1, 2, 3]
    (tmp_path / "worker_pandaids.json").write_text('["a"]')
    with pytest.raises(PilotError):
        ap.read_pandaids()


def test_pull_mode_waits_for_the_job_with_a_bound(tmp_path):
    ap = HarvesterAccessPoint(tmp_path)
    with pytest.raises(PilotError) as err:
        ap.wait_for_jobs(timeout=0.3, first_delay=0.05)
    assert err.value.code == ErrorCode.EXCEEDEDMAXWAITTIME
    assert json.loads((tmp_path / "worker_requestjob.json").read_text()) == {"nJobs": 1}

    def harvester():
        (tmp_path / "HPCJobs.json").write_text(json.dumps({"11": JOB}))

    t = threading.Timer(0.2, harvester)
    t.start()
    jobs = ap.wait_for_jobs(timeout=30, first_delay=0.05)
    t.join()
    assert [j.panda_id for j in jobs] == [11]


def test_merge_write_never_overwrites_a_pending_file(tmp_path):
    ap = HarvesterAccessPoint(tmp_path)
    path = tmp_path / "worker_updateevents.json"
    ap.merge_write("update_events", {"11": [{"eventRangeID": "a"}]})
    ap.merge_write("update_events", {"11": [{"eventRangeID": "b"}], "12": [{"eventRangeID": "c"}]})
    data = json.loads(path.read_text())
    assert [e["eventRangeID"] for e in data["11"]] == ["a", "b"] and len(data["12"]) == 1
    # Harvester takes it: X -> X.read; the pilot writes a fresh X and leaves X.read alone
    path.rename(tmp_path / "worker_updateevents.json.read")
    ap.merge_write("update_events", {"11": [{"eventRangeID": "d"}]})
    assert json.loads(path.read_text()) == {"11": [{"eventRangeID": "d"}]}
    assert len(json.loads((tmp_path / "worker_updateevents.json.read").read_text())["11"]) == 2


def test_merge_write_recovers_leftovers_and_sets_garbage_aside(tmp_path):
    ap = HarvesterAccessPoint(tmp_path)
    left = tmp_path / "event_status.dump.json.pilot-1-dead"
    left.write_text(json.dumps({"11": [{"eventRangeID": "old"}]}))
    (tmp_path / "event_status.dump.json").write_text('{"11": [{"eventRa')
    ap.merge_write("event_status_dump", {"11": [{"eventRangeID": "new"}]})
    data = json.loads((tmp_path / "event_status.dump.json").read_text())
    assert [e["eventRangeID"] for e in data["11"]] == ["old", "new"]
    assert not left.exists()
    assert len(list(tmp_path.glob("event_status.dump.json.bad.*"))) == 1


def test_take_event_ranges(tmp_path):
    ap = HarvesterAccessPoint(tmp_path)
    assert ap.take_event_ranges() is None
    path = tmp_path / "JobsEventRanges.json"
    path.write_text('{"11": [{"eventRangeID": "3-11-1-1-0"')
    with pytest.raises(PilotError) as err:
        ap.take_event_ranges()
    assert err.value.code == ErrorCode.MESSAGEHANDLINGFAILURE and path.exists()
    path.write_text('{"11": [{"eventRangeID": "3-11-1-1-0"}], "12": []}')
    assert ap.take_event_ranges() == {11: [{"eventRangeID": "3-11-1-1-0"}], 12: []}
    assert not path.exists()


def ranges(pid: int, n: int) -> list[dict]:
    return [
        {
            "eventRangeID": f"3-{pid}-1-{i}-0",
            "startEvent": i,
            "lastEvent": i,
            "LFN": "f",
            "GUID": "g",
        }
        for i in range(n)
    ]


def test_event_source_requests_waits_and_buffers(tmp_path):
    ap = HarvesterAccessPoint(tmp_path)
    src = HarvesterEventSource(ap, wait_timeout=30, first_delay=0.02)

    def harvester():
        request = json.loads((tmp_path / "worker_requestevents.json").read_text())
        assert request == {"11": {"pandaID": 11, "jobsetID": 2, "taskID": 3, "nRanges": 2}}
        (tmp_path / "worker_requestevents.json").unlink()
        (tmp_path / "JobsEventRanges.json").write_text(json.dumps({"11": ranges(11, 3)}))

    t = threading.Timer(0.1, harvester)
    t.start()
    assert len(src.get_event_ranges(11, 2, 3, 2)) == 2
    t.join()
    assert len(src.get_event_ranges(11, 2, 3, 2)) == 1  # the buffered third one, no request
    assert not (tmp_path / "worker_requestevents.json").exists()
    (tmp_path / "JobsEventRanges.json").write_text('{"11": []}')
    assert src.get_event_ranges(11, 2, 3, 2) == []
    assert src.get_event_ranges(11, 2, 3, 2) == []  # no more: no new request


def test_event_source_garbage_forever_times_out(tmp_path):
    ap = HarvesterAccessPoint(tmp_path)
    (tmp_path / "JobsEventRanges.json").write_text("garbage")
    src = HarvesterEventSource(ap, wait_timeout=0.3, first_delay=0.05)
    with pytest.raises(PilotError) as err:
        src.get_event_ranges(11, 2, 3, 2)
    assert err.value.code == ErrorCode.EXCEEDEDMAXWAITTIME and "not valid JSON" in err.value.detail
    assert not (tmp_path / "JobsEventRanges.json").exists()
    assert list(tmp_path.glob("JobsEventRanges.json.bad.*"))


def test_event_source_reports(tmp_path):
    ap = HarvesterAccessPoint(tmp_path, many_jobs=True)
    src = HarvesterEventSource(ap)
    done = RangeResult("3-11-1-1-0", RangeStatus.FINISHED, "/w/o.dat", 10, "0000abcd", 1.0, 2.0)
    bad = RangeResult("3-12-1-2-0", RangeStatus.FAILED, error_code=1224, error_diag="boom")
    assert src.report_results([done, bad]) == [True, True]
    d11 = json.loads((tmp_path / "11" / "event_status.dump.json").read_text())["11"][0]
    assert d11["path"] == "/w/o.dat" and d11["type"] == "es_output"
    assert (d11["chksum"], d11["fsize"], d11["eventStatus"]) == ("0000abcd", 10, "finished")
    assert d11["guid"]
    d12 = json.loads((tmp_path / "12" / "event_status.dump.json").read_text())["12"][0]
    assert d12 == {
        "eventRangeID": "3-12-1-2-0",
        "eventStatus": "failed",
        "errorCode": 1224,
        "errorDiag": "boom",
    }
    assert src.update_event_ranges([done.to_panda_v0()]) == [True]
    upd = json.loads((tmp_path / "11" / "worker_updateevents.json").read_text())
    assert upd == {"11": [{"eventRangeID": "3-11-1-1-0", "eventStatus": "finished"}]}


def test_upstream_heartbeat_and_final_update(tmp_path):
    ap = HarvesterAccessPoint(tmp_path)
    job = Job.from_panda({**JOB, "outFiles": "out.root,log.tgz", "logFile": "log.tgz"})
    out = tmp_path / "out.root"
    out.write_bytes(b"x")
    job.out_files[0].local_path = str(out)
    job.out_files[0].checksum = "ad:0000abcd"
    job.out_files[0].fsize = 1
    up = HarvesterUpstream(ap)
    assert up.heartbeat(job, {"jobId": 11, "state": "running", "node": "n1"}) is None
    attrs = json.loads((tmp_path / "worker_attributes.json").read_text())
    assert attrs["jobStatus"] == "running" and attrs["node"] == "n1" and "jobId" not in attrs
    assert (tmp_path / "worker_heartbeat.json").exists()
    assert not ap.kill_requested()
    fields = {
        "jobId": 11,
        "state": "finished",
        "pilotErrorCode": 0,
        "nEvents": 5,
        "metaData": json.dumps({"exitCode": 0}),
        "xml": "{}",
    }
    assert up.final_update(job, fields) is True
    attrs = json.loads((tmp_path / "worker_attributes.json").read_text())
    assert attrs["jobStatus"] == "finished" and attrs["nEvents"] == 5 and "xml" not in attrs
    assert json.loads((tmp_path / "jobReport.json").read_text()) == {"exitCode": 0}
    dump = json.loads((tmp_path / "event_status.dump.json").read_text())["11"]
    assert dump == [
        {"path": str(out), "type": "output", "chksum": "0000abcd", "fsize": 1, "guid": ""}
    ]
    assert ap.kill_requested()


def test_upstream_many_jobs_uses_subdirectories_and_does_not_kill(tmp_path):
    ap = HarvesterAccessPoint(tmp_path, many_jobs=True)
    up = HarvesterUpstream(ap)
    assert up.final_update(Job.from_panda(JOB), {"state": "failed", "pilotErrorCode": 1305})
    assert (
        json.loads((tmp_path / "11" / "worker_attributes.json").read_text())["jobStatus"]
        == "failed"
    )
    assert not ap.kill_requested()


def test_upstream_unwritable_access_point_is_not_a_crash(tmp_path):
    blocker = tmp_path / "ap"
    blocker.write_text("a file where the directory should be")
    up = HarvesterUpstream(HarvesterAccessPoint(blocker))
    job = Job.from_panda(JOB)
    assert up.heartbeat(job, {"state": "running"}) is None
    assert up.final_update(job, {"state": "finished"}) is False
