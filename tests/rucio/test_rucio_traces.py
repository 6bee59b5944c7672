"""Traces reach the real Rucio server; kept and sent later when it is down; authenticated
where the trace server is not this machine."""

from __future__ import annotations

import json
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from pilot.data.rucio import RucioSettings
from pilot.data.traces import SPOOL_DIR, UNSENT_NAME, Trace, TraceSender
from pilot.job import FileSpec
from tests.rucio.conftest import seed, wait_for_traces
from tests.rucio.test_rucio_job import pilot_run, rucio_job


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_traces_are_spooled_while_rucio_is_down_and_sent_before_the_next_job(
    rucio_server, rucio_client, tmp_path, unique
) -> None:
    data = os.urandom(1000)
    name_in = f"sp_in.{unique}"
    seed(rucio_server, rucio_client, name_in, data, tmp=tmp_path / "seed")
    job = rucio_job(tmp_path, 7101, name_in, data, f"sp_out.{unique}", f"ds.sp.{unique}")
    dead = f"http://127.0.0.1:{closed_port()}/traces/"
    proc, record = pilot_run(rucio_server, tmp_path, job, "--trace-url", dead)
    assert proc.returncode == 0 and record["state"] == "finished", proc.stderr
    spool = tmp_path / "work" / SPOOL_DIR / UNSENT_NAME
    kept = [json.loads(x) for x in spool.read_text().splitlines()]
    assert sorted(t["filename"] for t in kept) == sorted(
        [name_in, f"sp_out.{unique}", "log.7101.tgz"]
    )
    assert not [t for t in rucio_server.traces() if t.get("appid") == "7101"]
    # the next job (Rucio's /traces/ by default) sends the spool first
    job2 = rucio_job(tmp_path, 7102, name_in, data, f"sp_out2.{unique}", f"ds.sp.{unique}")
    proc, record = pilot_run(rucio_server, tmp_path, job2)
    assert proc.returncode == 0, proc.stderr
    uuids = {t["uuid"] for t in kept}
    traces = wait_for_traces(rucio_server, lambda ts: uuids <= {t.get("uuid") for t in ts})
    assert uuids <= {t.get("uuid") for t in traces}
    assert spool.read_text() == ""


class _Capture(BaseHTTPRequestHandler):
    seen: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.seen.append({"headers": dict(self.headers), "body": json.loads(body)})
        self.send_response(201)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_trace_authentication_where_the_server_is_not_local(rucio_server, tmp_path) -> None:
    settings = RucioSettings.from_environ()
    assert not TraceSender(settings.trace_url, auth=settings.trace_auth).needs_auth
    for far in ("https://rucio-lb-prod.cern.ch/traces/", "http://10.1.2.3/traces/"):
        assert TraceSender(far, auth=settings.trace_auth).needs_auth  # nothing is sent there
    assert not TraceSender("https://rucio.example/traces/").needs_auth  # nothing to send
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Capture)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/traces/"
        sender = TraceSender(url, 5, auth=settings.trace_auth, always_auth=True)
        trace = Trace.for_file(None, FileSpec("f.dat", "input", scope="tests"), "get").done(1)
        assert sender.send(trace)
    finally:
        server.shutdown()
        server.server_close()
    (seen,) = _Capture.seen
    token = seen["headers"]["X-Rucio-Auth-Token"]
    assert seen["headers"]["X-Rucio-Account"] == "root" and seen["body"]["filename"] == "f.dat"
    # the token is one the real server accepts: it validates it
    import requests

    check = requests.get(
        f"{rucio_server.url}/auth/validate", headers={"X-Rucio-Auth-Token": token}, timeout=10
    )
    assert check.status_code == 200, check.text
    # and the real /traces/ takes an authenticated trace as it takes any
    real = TraceSender(settings.trace_url, 5, auth=settings.trace_auth, always_auth=True)
    assert real.send(trace.done(2)) and real.sent == 1


def test_an_unreadable_spool_line_is_dropped_and_the_rest_kept(tmp_path: Path) -> None:
    spool = tmp_path / UNSENT_NAME
    dead = f"http://127.0.0.1:{closed_port()}/traces/"
    spool.write_text('{"filename": "a"}\nnot json\n{"filename": "b"}\n')
    sender = TraceSender(dead, 2, unsent=spool)
    assert sender.resend() == 0 and sender.failed == 1  # stops at the first refusal
    assert [json.loads(x)["filename"] for x in spool.read_text().splitlines()] == ["a", "b"]
