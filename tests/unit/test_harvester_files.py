"""Harvester's access-point files: names, layout, reading, the rename protocol."""

from __future__ import annotations

import json
import threading
import time

import pytest

from pilot.comm.harvester import (
    PER_JOB_FILES,
    HarvesterAccessPoint,
    HarvesterEventSource,
    HarvesterFiles,
    HarvesterUpstream,
    MapType,
    WorkerHeartbeat,
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


def test_many_to_one_layout_is_harvesters(tmp_path):
    """SharedFileMessenger.get_access_point: per-job files in <PandaID>/, requests,
    ranges, PandaIDs, heartbeat and kill file at the top."""
    ap = HarvesterAccessPoint(tmp_path, map_type="ManyToOne")
    assert ap.many_jobs and ap.map_type is MapType.MANY_TO_ONE
    for key in ("job_spec", "pool_file_catalog", "event_status_dump", "update_events"):
        assert ap.path(key, 11).parent == tmp_path / "11"
    assert ap.path("worker_attributes", 11) == tmp_path / "11" / "worker_attributes.json"
    assert ap.path("job_report", 11) == tmp_path / "11" / "jobReport.json"
    for key in ("event_request", "event_ranges", "job_request", "pandaids", "heartbeat"):
        assert ap.path(key, 11).parent == tmp_path
    assert ap.path("kill_worker") == tmp_path / "kill_worker.json"
    assert "event_request" not in PER_JOB_FILES and "job_spec" in PER_JOB_FILES
    with pytest.raises(PilotError):
        ap.path("worker_attributes")


def test_one_to_one_keeps_everything_at_the_top(tmp_path):
    ap = HarvesterAccessPoint(tmp_path, map_type="OneToOne")
    for key in ("job_spec", "event_ranges", "event_status_dump", "worker_attributes"):
        assert ap.path(key, 11).parent == tmp_path


def test_map_type_names(tmp_path):
    assert MapType.parse("auto") is None and MapType.parse("manytoone") is MapType.MANY_TO_ONE
    for bad in ("OneToMany", "Several"):
        with pytest.raises(PilotError) as err:
            HarvesterAccessPoint(tmp_path, map_type=bad)
        assert err.value.code == ErrorCode.BADQUEUECONFIGURATION


def test_map_type_detected_from_where_the_job_spec_is(tmp_path):
    ap = HarvesterAccessPoint(tmp_path)
    assert ap.detect_map_type() is None and ap.map_type is MapType.ONE_TO_ONE
    (tmp_path / "12").mkdir()
    (tmp_path / "12" / "HPCJobs.json").write_text(json.dumps({"12": {**JOB, "PandaID": "12"}}))
    assert HarvesterAccessPoint(tmp_path).map_type is MapType.MANY_TO_ONE
    (tmp_path / "HPCJobs.json").write_text(json.dumps({"11": JOB}))
    assert HarvesterAccessPoint(tmp_path).map_type is MapType.ONE_TO_ONE


def test_many_to_one_reads_one_spec_per_job_directory(tmp_path):
    for pid in (21, 22, 23):
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "HPCJobs.json").write_text(
            json.dumps({str(pid): {**JOB, "PandaID": str(pid)}})
        )
    (tmp_path / "worker_pandaids.json").write_text("[23, 21, 22]")
    ap = HarvesterAccessPoint(tmp_path)
    assert [j.panda_id for j in ap.worker_jobs()] == [23, 21, 22]
    # a spec holding another job, and a PandaID without a directory, fail on their own
    (tmp_path / "22" / "HPCJobs.json").write_text(json.dumps({"99": {**JOB, "PandaID": "99"}}))
    (tmp_path / "worker_pandaids.json").write_text("[23, 21, 22, 24]")
    found = ap.scan_jobs()
    assert [j.panda_id for j in found.jobs] == [23, 21]
    assert found.failed[22].code == ErrorCode.CONVERSIONFAILURE
    assert found.failed[24].code == ErrorCode.NOSUCHFILE


def test_cgi_job_spec(tmp_path):
    from urllib.parse import urlencode

    (tmp_path / "HPCJobs.json").write_text(urlencode(JOB))
    assert [j.panda_id for j in HarvesterAccessPoint(tmp_path).read_jobs()] == [11]


def test_fail_worker_leaves_attributes_and_the_kill_file(tmp_path):
    ap = HarvesterAccessPoint(tmp_path, map_type="ManyToOne")
    (tmp_path / "worker_pandaids.json").write_text("[31, 32]")
    ap.fail_worker({31: PilotError(ErrorCode.NOTDEFINED, "bad")}, node="n1", kill=False)
    attrs = json.loads((tmp_path / "31" / "worker_attributes.json").read_text())
    assert attrs["jobStatus"] == "failed" and attrs["pilotErrorCode"] == 1311
    assert attrs["node"] == "n1" and len(attrs["endTime"]) == 19
    assert not ap.kill_requested()
    ap.fail_worker({0: PilotError(ErrorCode.CONVERSIONFAILURE, "garbage")})
    for pid in (31, 32):
        attrs = json.loads((tmp_path / str(pid) / "worker_attributes.json").read_text())
        assert attrs["jobStatus"] == "failed"
    assert json.loads((tmp_path / "32" / "worker_attributes.json").read_text())[
        "pilotErrorCode"
    ] == int(ErrorCode.CONVERSIONFAILURE)
    assert ap.kill_requested()
    # nothing known at all: the reason goes to the top
    empty = tmp_path / "empty"
    empty.mkdir()
    HarvesterAccessPoint(empty, map_type="ManyToOne").fail_worker({0: PilotError(1008, "x")})
    assert json.loads((empty / "worker_attributes.json").read_text())["pilotErrorCode"] == 1008
    assert (empty / "kill_worker.json").exists()


def test_read_the_alternative_name_and_a_missing_spec(tmp_path):
    ap = HarvesterAccessPoint(tmp_path)
    with pytest.raises(PilotError) as err:
        ap.read_jobs()
    assert err.value.code == ErrorCode.NOSUCHFILE
    (tmp_path / "pandaJobData.out").write_text(json.dumps(JOB))
    assert [j.panda_id for j in ap.read_jobs()] == [11]


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
    request = tmp_path / "worker_requestjob.json"
    assert json.loads(request.read_text()) == {"nJobs": 1}

    def harvester():
        # Harvester's feed_jobs: the spec in place, then the PandaIDs, then the request goes
        (tmp_path / "HPCJobs.json").write_text('{"11": {"PandaID": "11", ')
        time.sleep(0.3)
        (tmp_path / "HPCJobs.json").write_text(json.dumps({"11": JOB}))
        (tmp_path / "worker_pandaids.json").write_text("[11]")
        request.unlink()

    t = threading.Thread(target=harvester)
    t.start()
    found = ap.wait_for_jobs(timeout=30, first_delay=0.05)
    t.join()
    assert [j.panda_id for j in found.jobs] == [11] and not found.failed


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
    src = HarvesterEventSource(ap, block=30, first_delay=0.02)

    def harvester():
        request = json.loads((tmp_path / "worker_requestevents.json").read_text())
        # no rate known yet: four times the free slots
        assert request == {"11": {"pandaID": 11, "jobsetID": 2, "taskID": 3, "nRanges": 8}}
        (tmp_path / "JobsEventRanges.json").write_text(json.dumps({"11": ranges(11, 3)}))
        (tmp_path / "worker_requestevents.json").unlink()

    t = threading.Timer(0.1, harvester)
    t.start()
    assert len(src.get_event_ranges(11, 2, 3, 2)) == 2
    t.join()
    # the buffered third one at once; the next request already went out, since what is
    # left no longer covers Harvester's latency at the rate ranges went
    assert len(src.get_event_ranges(11, 2, 3, 2)) == 1
    assert (tmp_path / "worker_requestevents.json").exists()
    (tmp_path / "worker_requestevents.json").unlink()
    (tmp_path / "JobsEventRanges.json").write_text('{"11": []}')
    assert src.get_event_ranges(11, 2, 3, 2) == []
    assert src.get_event_ranges(11, 2, 3, 2) == []  # no more: no new request
    assert not (tmp_path / "worker_requestevents.json").exists()


def test_event_source_does_not_block_while_an_answer_is_on_its_way(tmp_path):
    src = HarvesterEventSource(HarvesterAccessPoint(tmp_path))
    assert src.get_event_ranges(11, 2, 3, 2) is None
    assert (tmp_path / "worker_requestevents.json").exists() and src.requests == 1
    assert src.get_event_ranges(11, 2, 3, 2) is None and src.requests == 1  # asked once
    strict = HarvesterEventSource(HarvesterAccessPoint(tmp_path), pending_is_error=True)
    with pytest.raises(PilotError) as err:
        strict.get_event_ranges(11, 2, 3, 2)
    assert err.value.code == ErrorCode.EXCEEDEDMAXWAITTIME


def test_a_half_written_ranges_file_is_read_again_not_moved(tmp_path):
    src = HarvesterEventSource(HarvesterAccessPoint(tmp_path))
    path = tmp_path / "JobsEventRanges.json"
    whole = json.dumps({"11": ranges(11, 4)})
    path.write_text(whole[: len(whole) // 2])  # Harvester's open("w") caught mid-write
    assert src.get_event_ranges(11, 2, 3, 4) is None
    assert path.exists() and not list(tmp_path.glob("*.bad.*"))
    path.write_text(whole)
    assert len(src.get_event_ranges(11, 2, 3, 4)) == 4 and not path.exists()


def test_garbage_that_stays_garbage_is_set_aside_and_asked_again(tmp_path):
    now = [0.0]
    src = HarvesterEventSource(HarvesterAccessPoint(tmp_path), clock=lambda: now[0])
    (tmp_path / "JobsEventRanges.json").write_text("garbage")
    assert src.get_event_ranges(11, 2, 3, 2) is None
    (tmp_path / "worker_requestevents.json").unlink()  # Harvester took the request
    now[0] = 30.0
    assert src.get_event_ranges(11, 2, 3, 2) is None
    assert (tmp_path / "JobsEventRanges.json").exists()  # within the grace: may be written
    now[0] = 61.0
    assert src.get_event_ranges(11, 2, 3, 2) is None
    assert not (tmp_path / "JobsEventRanges.json").exists()
    assert list(tmp_path.glob("JobsEventRanges.json.bad.*"))
    assert (tmp_path / "worker_requestevents.json").exists()


def test_a_request_lost_or_unanswered_is_asked_again(tmp_path):
    now = [0.0]
    src = HarvesterEventSource(
        HarvesterAccessPoint(tmp_path), wait_timeout=100.0, clock=lambda: now[0]
    )
    request = tmp_path / "worker_requestevents.json"
    assert src.get_event_ranges(11, 2, 3, 2) is None and src.requests == 1
    request.unlink()  # deleted by Harvester's previous feed: never answered
    assert src.get_event_ranges(11, 2, 3, 2) is None
    assert request.exists() and src.requests == 2
    now[0] = 150.0
    with pytest.raises(PilotError) as err:
        src.get_event_ranges(11, 2, 3, 2)
    assert err.value.code == ErrorCode.EXCEEDEDMAXWAITTIME and src.requests == 3
    assert src.get_event_ranges(11, 2, 3, 2) is None  # still waiting: not the end of the job


def test_requests_cover_several_harvester_cycles_at_the_measured_rate(tmp_path):
    now = [0.0]
    src = HarvesterEventSource(
        HarvesterAccessPoint(tmp_path), latency=100.0, cycles=3.0, clock=lambda: now[0]
    )
    path, request = tmp_path / "JobsEventRanges.json", tmp_path / "worker_requestevents.json"
    assert src.get_event_ranges(11, 2, 3, 2) is None
    path.write_text(json.dumps({"11": ranges(11, 500)}))
    request.unlink()
    for _ in range(10):  # 20 ranges in 10 s: 2 per second
        now[0] += 1.0
        assert len(src.get_event_ranges(11, 2, 3, 2)) == 2
    assert not request.exists()  # 480 left cover the latency
    for _ in range(150):
        now[0] += 1.0
        src.get_event_ranges(11, 2, 3, 2)
    # the buffer fell under one latency's worth (200): asked ahead, for three cycles' worth
    asked = json.loads(request.read_text())["11"]["nRanges"]
    assert src.rate(11) == pytest.approx(2.0, rel=0.05)
    assert 590 <= asked + 200 <= 610  # with what is left, three cycles at 2 per second


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
    # status-only updates go into the dump too: Harvester rewrites worker_updateevents.json
    # from the dump, over whatever the pilot put there
    assert src.update_event_ranges([bad.to_panda_v0()]) == [True]
    assert not (tmp_path / "12" / "worker_updateevents.json").exists()
    d12 = json.loads((tmp_path / "12" / "event_status.dump.json").read_text())["12"]
    assert d12[-1] == {"eventRangeID": "3-12-1-2-0", "eventStatus": "failed"}


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


def test_worker_heartbeat_refreshes_while_it_runs(tmp_path):
    ap = HarvesterAccessPoint(tmp_path)
    stamps = []
    with WorkerHeartbeat(ap, 0.05, info=lambda: {"state": "running"}) as beat:
        for _ in range(100):  # bounded: until three refreshes were seen
            stamps.append(json.loads((tmp_path / "worker_heartbeat.json").read_text()))
            if len({s["timestamp"] for s in stamps}) >= 3:
                break
            time.sleep(0.05)
    assert len({s["timestamp"] for s in stamps}) >= 3 and beat.beats >= 3
    assert stamps[-1]["state"] == "running"
    with pytest.raises(PilotError):
        WorkerHeartbeat(ap, 0)
