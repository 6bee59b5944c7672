"""Garbage requests get a 4xx with a reason, and the dispatcher keeps serving; tokens."""

from __future__ import annotations

import gzip
import json
import socket
from pathlib import Path

import pytest
import requests

from pilot.comm.panda import PandaClient
from pilot.errors import PilotError
from pilot.server.serve import EmbeddedServer

JSON = {"Accept": "application/json"}
AUTH = {**JSON, "Authorization": "Bearer admintoken"}


@pytest.fixture
def server(tmp_path: Path) -> EmbeddedServer:
    s = EmbeddedServer(tmp_path / "server.db", token="admintoken").start()
    s.load_task({"job": {"transformation": "x"}, "nRanges": 3})
    yield s
    s.stop()


def _post(server: EmbeddedServer, method: str, **kw) -> requests.Response:
    kw.setdefault("headers", {**JSON, "Authorization": f"Bearer {server.token}"})
    return requests.post(f"{server.url}/server/panda/{method}", timeout=10, **kw)


GARBAGE = [
    ("nosuchMethod", {"data": {"a": "b"}}, 404),
    ("getJob", {"data": {}}, 400),  # siteName missing
    ("getJob", {"data": b"\xff\xfe=\xff", "headers": {**AUTH}}, 400),  # not UTF-8
    ("updateJob", {"data": {"jobId": "abc", "state": "running"}}, 400),
    ("updateJob", {"data": {"jobId": "1001", "state": "exploded"}}, 400),
    ("updateJob", {"data": {"jobId": "-4", "state": "running"}}, 400),
    ("getEventRanges", {"data": {"pandaID": "1001", "nRanges": "1e9x"}}, 400),
    ("getEventRanges", {"data": {"pandaID": "1001", "nRanges": "200000"}}, 400),
    ("updateEventRanges", {"data": {"eventRanges": "[{not json"}}, 400),
    ("updateEventRanges", {"data": {"eventRanges": '{"a": 1}'}}, 400),
    ("updateEventRanges", {"data": {"eventRanges": "[1, 2]"}}, 400),
    ("updateEventRanges", {"data": {"eventRanges": '[{"eventRangeID": 5}]'}}, 400),
    (
        "updateEventRanges",
        {"data": {"eventRanges": '[{"eventRangeID": "1-2-3-4-5", "eventStatus": "great"}]'}},
        400,
    ),
    (
        "getJob",
        {"data": b"[1,2]", "headers": {**AUTH, "Content-Type": "application/json"}},
        400,
    ),
    (
        "getJob",
        {"data": b"{broken", "headers": {**AUTH, "Content-Type": "application/json"}},
        400,
    ),
    (
        "getJob",
        {"data": b"\x1f\x8bnot really gzip", "headers": {**AUTH, "Content-Encoding": "gzip"}},
        400,
    ),
    ("getJob", {"data": b"<xml/>", "headers": {**AUTH, "Content-Type": "text/xml"}}, 415),
]


@pytest.mark.parametrize("method,kw,status", GARBAGE)
def test_garbage_gets_4xx_with_reason(server: EmbeddedServer, method, kw, status) -> None:
    r = _post(server, method, **kw)
    assert r.status_code == status
    body = r.json()
    assert body["StatusCode"] != 0 and body["errorDialog"]
    # and the server still serves
    assert PandaClient(server.url, token=server.token, retries=0).update_event_ranges([]) == []
    assert requests.get(server.url + "/healthz", timeout=10).status_code == 200


def test_oversized_and_bomb_bodies(server: EmbeddedServer) -> None:
    limit = 32 * 1024 * 1024
    bomb = gzip.compress(b"a" * (limit + 10))  # ~32 kB compressed
    r = _post(
        server,
        "getJob",
        data=bomb,
        headers={**AUTH, "Content-Type": "application/json", "Content-Encoding": "gzip"},
    )
    assert r.status_code == 413
    # a Content-Length beyond the limit is refused before the body is read
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(
            b"POST /server/panda/getJob HTTP/1.1\r\nHost: x\r\nAccept: application/json\r\n"
            b"Authorization: Bearer admintoken\r\n"
            b"Content-Length: 999999999999\r\n\r\nsiteName=Q"
        )
        head = s.recv(4096)
    assert head.split()[1] in (b"413", b"400")
    assert requests.get(server.url + "/healthz", timeout=10).status_code == 200


def test_raw_socket_garbage_keeps_server_alive(server: EmbeddedServer) -> None:
    for junk in (b"\x00\x01\x02garbage\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n", b"POST"):
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            s.sendall(junk)
            s.shutdown(socket.SHUT_WR)
            s.recv(4096)
    assert requests.get(server.url + "/healthz", timeout=10).status_code == 200


def test_wrong_http_verbs(server: EmbeddedServer) -> None:
    assert requests.delete(server.url + "/server/panda/getJob", timeout=10).status_code == 405
    r = requests.post(server.url + "/cache/schedconfig/Q.all.json", timeout=10)
    assert r.status_code == 405


def test_admin_needs_the_token(server: EmbeddedServer) -> None:
    job = {"transformation": "/bin/true"}
    assert requests.post(server.url + "/admin/jobs", json=job, timeout=10).status_code == 403
    wrong = {"Authorization": "Bearer nope"}
    r = requests.post(server.url + "/admin/jobs", json=job, headers=wrong, timeout=10)
    assert r.status_code == 403 and r.json()["StatusCode"] == 50
    good = {"Authorization": "Bearer admintoken"}
    r = requests.post(server.url + "/admin/jobs", json=job, headers=good, timeout=10)
    assert r.status_code == 201 and len(r.json()["PandaIDs"]) == 1
    r = requests.post(server.url + "/admin/jobs", json={"PandaID": 3}, headers=good, timeout=10)
    assert r.status_code == 400 and "transformation" in r.json()["errorDialog"]
    r = requests.post(server.url + "/admin/tasks", json={"job": 1}, headers=good, timeout=10)
    assert r.status_code == 400
    r = requests.post(server.url + "/admin/cancel", json={"PandaID": 77}, headers=good, timeout=10)
    assert r.status_code == 404
    # pilot calls need the token, on loopback too
    assert PandaClient(server.url, token=server.token, retries=0).get_job("Q") is not None


def test_pilot_calls_need_the_token_on_loopback_too(tmp_path: Path) -> None:
    with EmbeddedServer(tmp_path / "s.db", token="tok") as server:
        assert server.require_pilot_token and server.host == "127.0.0.1"
        assert server.token_file.read_text().strip() == "tok"
        assert server.token_file.stat().st_mode & 0o777 == 0o600
        (pid,) = server.load_jobs({"transformation": "x"})
        r = _post(server, "getJob", data={"siteName": "Q"}, headers=JSON)
        assert r.status_code == 403 and r.json()["StatusCode"] == 50
        bad = {**JSON, "Authorization": "Bearer bad"}
        assert _post(server, "getJob", data={"siteName": "Q"}, headers=bad).status_code == 403
        for headers in ({}, {"Authorization": "Bearer bad"}):  # /api/v1: as PanDA answers
            r = requests.post(
                server.url + "/api/v1/pilot/acquire_jobs",
                json={"site_name": "Q"},
                headers={**JSON, **headers},
                timeout=10,
            )
            assert r.status_code == 403 and r.text.startswith("ERROR : Token authentication")
        r = requests.post(
            server.url + "/api/v1/pilot/update_job",
            json={"job_id": pid, "job_status": "failed"},
            headers=JSON,
            timeout=10,
        )
        assert r.status_code == 403
        assert server.store.job(pid)["status"] == "activated"  # nothing changed
        assert server.store.updates(pid) == []
        for api in ("v1", "legacy"):
            with pytest.raises(PilotError):
                PandaClient(server.url, retries=0, api=api).get_job("Q")
        job = PandaClient(server.url, token="tok", retries=0).get_job("Q")
        assert job is not None and json.loads(json.dumps(job))["PandaID"] == pid
        # traces from this machine need none; the system/is_alive check none either
        trace = {"eventType": "get_sm"}
        assert requests.post(server.url + "/traces/", json=trace, timeout=10).status_code == 201
        alive = requests.get(server.url + "/api/v1/system/is_alive", headers=JSON, timeout=10)
        assert alive.json() == {
            "success": True,
            "message": "",
            "data": None,
        }
        # queue descriptions stay public, as PanDA's are
        assert requests.get(server.url + "/cache/schedconfig/Q.all.json", timeout=10).ok
