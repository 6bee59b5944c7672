"""Legacy calls become /api/v1 calls with the exact names and JSON types the server checks."""

from __future__ import annotations

import json

import pytest

from pilot.comm.panda import ServerReply
from pilot.comm.pandaapi import ConversionError, from_v1, to_v1


def test_getjob_parameters_renamed_typed_and_extras_left_out() -> None:
    endpoint, params, dropped = to_v1(
        "getJob",
        {"siteName": "Q", "mem": "2000", "diskSpace": 100.0, "cpu": 8, "nJobs": "1",
         "prodSourceLabel": "managed", "workingGroup": "NULL", "getProxyKey": False},
    )  # fmt: skip
    assert endpoint.path == "pilot/acquire_jobs" and endpoint.verb == "POST"
    assert params == {"site_name": "Q", "memory": 2000, "disk_space": 100, "n_jobs": 1,
                      "prod_source_label": "managed", "get_proxy_key": "False"}  # fmt: skip
    assert type(params["memory"]) is int and sorted(dropped) == ["cpu", "workingGroup"]


def test_update_job_fields() -> None:
    _, params, dropped = to_v1(
        "updateJob",
        {"jobId": "7", "state": "finished", "xml": {"a": {}}, "pilotErrorCode": "0",
         "cpuConversionFactor": 1.0, "maxRSS": "1234", "meanCoreCount": 1.6,
         "timestamp": "2025-01-01T00:00:00", "workdir": "/w", "pilotErrorDiag": ""},
    )  # fmt: skip
    assert params == {"job_id": 7, "job_status": "finished", "job_output_report": '{"a": {}}',
                      "pilot_error_code": 0, "cpu_conversion_factor": 1.0, "max_rss": 1234,
                      "mean_core_count": 2}  # fmt: skip
    assert sorted(dropped) == ["timestamp", "workdir"]
    with pytest.raises(ConversionError):
        to_v1("updateJob", {"jobId": "seven", "state": "running"})
    with pytest.raises(ConversionError):
        to_v1("updateJob", {"jobId": 7})


def test_event_ranges_are_a_json_string_and_object_store_id_is_never_sent() -> None:
    entries = [{"eventRangeID": "1-2-3-4-5", "eventStatus": "finished"}]
    _, params, _ = to_v1("updateEventRanges", {"eventRanges": entries, "version": "0"})
    assert params == {"event_ranges": json.dumps(entries), "version": 0}
    _, params, dropped = to_v1(
        "updateEventRange", {"eventRangeID": "r", "eventStatus": "finished", "objstoreID": 3}
    )
    assert "object_store_id" not in params and dropped == ["objstoreID"]


def test_answers_in_the_legacy_form() -> None:
    no_jobs = {"success": False, "message": "No jobs in PanDA", "data": None}
    assert from_v1("getJob", no_jobs)["StatusCode"] == 20
    job = {"success": True, "message": "", "data": {"StatusCode": 0, "jobs": [{"PandaID": 3}]}}
    assert from_v1("getJob", job) == {"PandaID": 3, "StatusCode": 0}
    ok = {"success": True, "message": "", "data": {"StatusCode": 0, "command": None}}
    assert from_v1("updateJob", ok) == {"StatusCode": 0, "command": "NULL"}
    # update_job answers a database failure with success true: the StatusCode says it
    db = {"success": True, "message": "Database error", "data": {"StatusCode": 30}}
    reply = ServerReply(200, from_v1("updateJob", db), db)
    assert not reply.ok and not reply.permanent_failure  # may pass: spooled, sent again
    bad = {"success": False, "message": "Invalid job status: x", "data": {"StatusCode": 50}}
    reply = ServerReply(200, from_v1("updateJob", bad), bad)
    assert reply.permanent_failure  # a resend cannot help
    typed = {"success": False, "message": "Type error: 'job_id' must be of type int", "data": None}
    assert ServerReply(200, from_v1("updateJob", typed), typed).permanent_failure
    timeout = {"success": False, "message": "Timed out", "data": None}
    assert from_v1("getJob", timeout)["StatusCode"] == 10
    ranges = {"success": True, "message": "", "data": [{"eventRangeID": "a"}]}
    assert from_v1("getEventRanges", ranges)["eventRanges"] == [{"eventRangeID": "a"}]
    single = {"success": None, "message": "", "data": {"Command": "{}"}}
    assert from_v1("updateEventRange", single)["StatusCode"] == 0  # null: a non-final status
