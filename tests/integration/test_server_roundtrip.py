"""Client and dispatcher against each other over real HTTP on 127.0.0.1."""

from __future__ import annotations

import gzip
import json
import socket
from pathlib import Path

import pytest
import requests

from pilot.comm.panda import PandaClient
from pilot.errors import ErrorCode, PilotError
from pilot.job import EventRange, Job
from pilot.queue import QueueConfig, load_queue, schedconfig_url
from pilot.server.serve import EmbeddedServer

JSON = {"Accept": "application/json"}
AUTH_ONLY = {"Authorization": "Bearer admintoken"}
AUTH = {**JSON, **AUTH_ONLY}


@pytest.fixture
def server(tmp_path: Path) -> EmbeddedServer:
    s = EmbeddedServer(tmp_path / "server.db", token="admintoken").start()
    yield s
    s.stop()


@pytest.fixture(params=["v1", "legacy"])
def client(server: EmbeddedServer, request: pytest.FixtureRequest) -> PandaClient:
    return PandaClient(server.url, token=server.token, retries=0, api=request.param)


def test_get_job_round_trip(server: EmbeddedServer, client: PandaClient) -> None:
    (pid,) = server.load_jobs(
        {
            "transformation": "/bin/echo",
            "jobPars": "hello",
            "computingSite": "Q",
            "coreCount": 2,
            "inFiles": "a.root,b.root",
            "GUID": "g1,g2",
            "fsize": "1,2",
            "checksum": "ad:00000001,ad:00000002",
        }
    )
    assert client.get_job("OTHER") is None
    definition = client.get_job("Q", prodSourceLabel="managed", mem=2000)
    # legacy PanDA sends strings, /api/v1 numbers; the pilot's model takes both as they come
    if client.api_in_use.value == "legacy":
        assert definition["PandaID"] == str(pid) and definition["coreCount"] == "2"
    else:
        assert definition["PandaID"] == pid and definition["coreCount"] == 2
    job = Job.from_panda(definition)
    assert job.panda_id == pid and [f.lfn for f in job.in_files] == ["a.root", "b.root"]
    assert client.get_job("Q") is None
    assert server.store.job(pid)["node"] == socket.gethostname()


def test_update_job_and_cancel(server: EmbeddedServer, client: PandaClient) -> None:
    (pid,) = server.load_jobs({"transformation": "x"})
    client.get_job("Q")
    reply = client.update_job({"jobId": pid, "state": "running", "attemptNr": 1})
    assert reply["command"] == "NULL"
    r = requests.post(
        server.url + "/admin/cancel",
        json={"PandaID": pid},
        headers={"Authorization": "Bearer admintoken"},
        timeout=10,
    )
    assert r.status_code == 200 and r.json()["outcome"] == "tobekilled"
    assert client.update_job({"jobId": pid, "state": "running"})["command"] == "tobekilled"
    final = {"jobId": pid, "state": "failed", "pilotErrorCode": 1144, "jobMetrics": "a=1 b=2"}
    client.update_job(final)
    (record,) = server.final_records(pid)
    assert record["fields"]["pilotErrorCode"] == "1144"
    assert record["fields"]["jobMetrics"] == "a=1 b=2"
    if client.api_in_use.value == "v1":  # as panda-server 1.0 answers a job it does not know
        assert client.update_job({"jobId": 987654, "state": "running"})["command"] == "tobekilled"
        return
    with pytest.raises(PilotError) as err:
        client.update_job({"jobId": 987654, "state": "running"})
    assert err.value.code == ErrorCode.COMMUNICATIONFAILURE


def test_event_ranges_round_trip(server: EmbeddedServer, client: PandaClient) -> None:
    task = server.load_task({"job": {"transformation": "x"}, "nRanges": 5, "jediTaskID": 9})
    (pid,) = task["PandaIDs"]
    client.get_job("Q")
    got = client.get_event_ranges(pid, 9, 9, 3)
    ranges = [EventRange.from_panda(r) for r in got]
    assert [r.event_range_id for r in ranges] == [f"9-{pid}-1-{k}-1" for k in (1, 2, 3)]
    entries = [{"eventRangeID": r.event_range_id, "eventStatus": "finished"} for r in ranges]
    assert client.update_event_ranges(entries) == [True, True, True]
    assert client.update_event_ranges(entries[:1]) == [False]
    # v1: a zip file per group of ranges
    rest = client.get_event_ranges(pid, 9, 9, 10)
    v1 = [
        {
            "zipFile": {"lfn": "out.zip", "adler32": "01234567", "fsize": 10, "objstoreID": 1},
            "eventRanges": [{"eventRangeID": r["eventRangeID"], "eventStatus": "failed"}],
        }
        for r in rest
    ]
    assert client.update_event_ranges(v1, version=1) == [True, True]
    assert server.store.range_counts(pid) == {"finished": 3, "failed": 2}
    assert client.get_event_ranges(pid, 9, 9, 10) == []


def test_single_range_update_and_json_gzip_body(server: EmbeddedServer) -> None:
    (pid,) = server.load_task({"job": {"transformation": "x"}, "nRanges": 2})["PandaIDs"]
    PandaClient(server.url, token=server.token).get_job("Q")
    body = gzip.compress(json.dumps({"pandaID": pid, "nRanges": 2}).encode())
    r = requests.post(
        server.url + "/server/panda/getEventRanges",
        data=body,
        headers={**AUTH, "Content-Type": "application/json", "Content-Encoding": "gzip"},
        timeout=10,
    )
    assert r.status_code == 200
    rid = r.json()["eventRanges"][0]["eventRangeID"]
    one = {"eventRangeID": rid, "eventStatus": "finished"}
    r = requests.post(
        server.url + "/server/panda/updateEventRange", data=one, headers=AUTH_ONLY, timeout=10
    )
    assert r.status_code == 200 and r.text.startswith("StatusCode=0")  # urlencoded answer
    r = requests.post(server.url + "/server/panda/updateEventRange", data=one, headers=AUTH)
    assert r.json()["StatusCode"] == 30


def test_schedconfig_served_and_parsed(server: EmbeddedServer) -> None:
    default = load_queue(schedconfig_url(server.url, "ANY_QUEUE"), "ANY_QUEUE")
    assert default.nickname == "ANY_QUEUE" and default.copytools_for("pw") == ["copy"]
    queue = {
        "nickname": "SITE_Q",
        "panda_resource": "SITE_Q",
        "state": "ACTIVE",
        "maxrss": "4000",
        "corecount": 8,
        "acopytools": {"pr": ["rucio"], "pw": ["xrdcp", "rucio"]},
        "copytools": {"rucio": {"setup": ""}, "xrdcp": {}},
        "container_type": "apptainer:pilot",
    }
    r = requests.post(
        server.url + "/admin/queues",
        json={"SITE_Q": queue},
        headers={"Authorization": "Bearer admintoken"},
        timeout=10,
    )
    assert r.status_code == 201
    raw = requests.get(server.url + "/cache/schedconfig/SITE_Q.all.json", timeout=10).json()
    assert raw["nickname"] == "SITE_Q"  # one queue, bare
    q = load_queue(schedconfig_url(server.url, "SITE_Q"))
    assert isinstance(q, QueueConfig)
    assert (q.maxrss, q.corecount, q.container_for("pilot")) == (4000, 8, "apptainer")
    assert q.copytools_for("pw") == ["xrdcp", "rucio"]
    bad = requests.get(server.url + "/cache/schedconfig/..%2Fetc.all.json", timeout=10)
    assert bad.status_code == 404


def test_traces_recorded(server: EmbeddedServer) -> None:
    trace = {"eventType": "get_sm", "clientState": "DONE", "filename": "a.root", "appid": "1"}
    r = requests.post(server.url + "/traces/", json=trace, timeout=10)
    assert r.status_code == 201
    assert requests.post(server.url + "/traces/", data=b"{nope", timeout=10).status_code == 400
    assert server.store.traces() == [trace]


def test_client_retries_then_fails_cleanly(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    delays: list[float] = []
    client = PandaClient(f"http://127.0.0.1:{port}", retries=3, backoff=0.5, sleep=delays.append)
    with pytest.raises(PilotError) as err:
        client.get_job("Q")
    assert err.value.code == ErrorCode.COMMUNICATIONFAILURE
    assert len(delays) == 3 and all(0 <= d <= 0.5 * 2**i for i, d in enumerate(delays))


def test_token_never_in_repr_or_errors(server: EmbeddedServer) -> None:
    client = PandaClient(server.url + "/nowhere", token="s3cr3t-token", retries=0)
    assert "s3cr3t" not in repr(client)
    with pytest.raises(PilotError) as err:
        client.get_job("Q")
    assert "s3cr3t" not in str(err.value)


def test_pull_jobs_until_none_or_max(server: EmbeddedServer, client: PandaClient) -> None:
    from pilot.comm.panda import pull_jobs

    ids = server.load_jobs([{"transformation": f"t{i}"} for i in range(4)])
    got = [(int(d["PandaID"]), s) for d, s in pull_jobs(client, "Q", max_jobs=3, mem=2000)]
    assert [pid for pid, _ in got] == ids[:3] and all(s >= 0 for _, s in got)
    assert [int(d["PandaID"]) for d, _ in pull_jobs(client, "Q")] == ids[3:]
    assert list(pull_jobs(client, "Q")) == []


def test_cric_forms_and_storages(server: EmbeddedServer) -> None:
    wrapped = requests.get(server.url + "/cache/schedconfig/QX.json", timeout=10).json()
    assert list(wrapped) == ["QX"] and wrapped["QX"]["atlas_site"] == "QX"
    assert requests.get(server.url + "/cache/ddmendpoints.json", timeout=10).json() == {}
    admin = {"Authorization": "Bearer admintoken"}
    rse = {"is_deterministic": True, "arprotocols": {"write_lan": [{"endpoint": "file://"}]}}
    r = requests.post(server.url + "/admin/storages", json={"D": rse}, headers=admin, timeout=10)
    assert r.status_code == 201
    assert requests.get(server.url + "/cache/ddmendpoints.json", timeout=10).json() == {"D": rse}
    for bad in ({}, {"D": {"arprotocols": {}}}, {"D": {**rse, "arprotocols": {"x": []}}}):
        r = requests.post(server.url + "/admin/storages", json=bad, headers=admin, timeout=10)
        assert r.status_code == 400


def test_client_reads_urlencoded_answers(tmp_path: Path) -> None:
    """An older server answering ``key=value&...`` whatever Accept says."""
    import threading
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    class Quiet(WSGIRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    def old_server(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"StatusCode=0&command=tobekilled"]

    httpd = make_server("127.0.0.1", 0, old_server, handler_class=Quiet)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.2})
    thread.start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        client = PandaClient(url, retries=0, api="legacy")
        assert client.update_job({"jobId": 1, "state": "running"})["command"] == "tobekilled"
    finally:
        httpd.shutdown()
        thread.join(10)
        httpd.server_close()
