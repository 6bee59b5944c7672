"""The http copytool against a real HTTP storage server on 127.0.0.1, with traces."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import socket
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pilot.data.copytools import make_copytool
from pilot.data.http import HttpCopyTool, redact_url
from pilot.data.staging import stage_in, stage_out
from pilot.data.traces import Trace, TraceSender, TraceSink
from pilot.errors import ErrorCode, PilotError
from pilot.job import FileSpec, Job

TOKEN = "s3cr3t-token-value-1234"


def adler(data: bytes) -> str:
    return f"{zlib.adler32(data) & 0xFFFFFFFF:08x}"


@dataclass
class Storage:
    """State of the test storage: files, behaviour switches, what it was sent."""

    files: dict[str, bytes] = field(default_factory=dict)
    mode: str = "normal"  # normal, 404, corrupt, slow, slowput, corrupt_put, flaky, strict
    flaky_left: int = 0
    auth: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    collections: set[str] = field(default_factory=lambda: {"/"})


def make_handler(store: Storage) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _start(self) -> bool:
            self.path = self.path.split("?", 1)[0]
            store.requests.append(f"{self.command} {self.path}")
            store.auth.append(self.headers.get("Authorization", ""))
            if store.mode == "flaky" and store.flaky_left > 0:
                store.flaky_left -= 1
                self._reply(503)
                return False
            return True

        def _reply(self, status: int, body: bytes = b"", headers: dict | None = None) -> None:
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if body and self.command != "HEAD":
                self.wfile.write(body)

        def _wait(self, seconds: float) -> None:
            store.stop.wait(seconds)

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if not self._start():
                return
            data = store.files.get(self.path)
            if data is None or store.mode == "404":
                self._reply(404)
                return
            if store.mode == "truncate":  # promise more than is sent, then hang up
                self.send_response(200)
                self.send_header("Content-Length", str(len(data) + 1000))
                self.end_headers()
                self.wfile.write(data[:100])
                self.close_connection = True
                return
            if store.mode == "corrupt":
                data = data[:-1] + bytes([data[-1] ^ 0xFF])
            if store.mode == "slow":
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                for i in range(0, len(data), 1024):  # trickle: a byte block every 0.3 s
                    if store.stop.is_set():
                        return
                    try:
                        self.wfile.write(data[i : i + 1024])
                        self.wfile.flush()
                    except OSError:
                        return
                    self._wait(0.3)
                return
            self._reply(200, data)

        def do_HEAD(self) -> None:  # noqa: N802
            if not self._start():
                return
            data = store.files.get(self.path)
            if data is None:
                self._reply(404)
                return
            digest = (
                f"adler32={adler(data)},md5={base64.b64encode(hashlib.md5(data).digest()).decode()}"
            )
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Digest", digest)
            self.end_headers()

        def do_PUT(self) -> None:  # noqa: N802
            if not self._start():
                return
            size = int(self.headers.get("Content-Length", "0"))
            data = self.rfile.read(size)
            parent = self.path.rsplit("/", 1)[0] + "/"
            if store.mode == "strict" and parent not in store.collections:
                self._reply(409)
                return
            if store.mode == "slowput":
                self._wait(10)
            if store.mode == "corrupt_put":
                data = data + b"!"
            store.files[self.path] = data
            self._reply(201)

        def do_MKCOL(self) -> None:  # noqa: N802
            if not self._start():
                return
            if self.path in store.collections:
                self._reply(405)
                return
            store.collections.add(self.path)
            self._reply(201)

    return Handler


class Receiver(BaseHTTPRequestHandler):
    """Trace receiver: keeps every JSON body POSTed to it."""

    protocol_version = "HTTP/1.1"
    received: list[dict] = []

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.server.received.append(json.loads(body))  # type: ignore[attr-defined]
        self.send_response(201)
        self.send_header("Content-Length", "0")
        self.end_headers()


def serve(handler: type[BaseHTTPRequestHandler]) -> tuple[ThreadingHTTPServer, str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
    ).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture
def storage() -> Iterator[tuple[Storage, str]]:
    store = Storage()
    server, base = serve(make_handler(store))
    yield store, base
    store.stop.set()
    server.shutdown()
    server.server_close()


@pytest.fixture
def traces() -> Iterator[tuple[list[dict], str]]:
    server, base = serve(Receiver)
    server.received = []  # type: ignore[attr-defined]
    yield server.received, f"{base}/traces/"  # type: ignore[attr-defined]
    server.shutdown()
    server.server_close()


def dead_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


def tool(**kw: object) -> HttpCopyTool:
    kw.setdefault("backoff", 0.05)
    kw.setdefault("discover_token", False)
    return HttpCopyTool(**kw)  # type: ignore[arg-type]


DATA = bytes(range(256)) * 400  # 100 kB


def test_get_with_checksums_and_token(storage, tmp_path: Path, caplog) -> None:
    store, base = storage
    store.files["/scope/in.root"] = DATA
    caplog.set_level(logging.DEBUG)
    result = tool(token=TOKEN).get(
        f"{base}/scope/in.root", tmp_path / "in.root", checksum=f"ad:{adler(DATA)}", timeout=20
    )
    assert (tmp_path / "in.root").read_bytes() == DATA
    assert result.size == len(DATA) and result.adler32 == adler(DATA)
    assert result.md5 == hashlib.md5(DATA).hexdigest()
    assert store.auth[-1] == f"Bearer {TOKEN}"
    assert TOKEN not in caplog.text and TOKEN not in repr(tool(token=TOKEN))
    md5 = tool().get(
        f"{base}/scope/in.root",
        tmp_path / "b",
        checksum=f"md5:{hashlib.md5(DATA).hexdigest()}",
        timeout=20,
    )
    assert md5.size == len(DATA)


def test_get_missing_file_is_1331_without_retry(storage, tmp_path: Path) -> None:
    store, base = storage
    with pytest.raises(PilotError) as err:
        tool().get(f"{base}/nope.root", tmp_path / "nope.root", timeout=10)
    assert err.value.code == ErrorCode.MISSINGINPUTFILE
    assert store.requests == ["GET /nope.root"]
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("checksum", "code"),
    [("ad", ErrorCode.GETADMISMATCH), ("md5", ErrorCode.GETMD5MISMATCH)],
)
def test_get_wrong_content(storage, tmp_path: Path, checksum: str, code: int) -> None:
    store, base = storage
    store.files["/f"] = DATA
    store.mode = "corrupt"
    value = adler(DATA) if checksum == "ad" else hashlib.md5(DATA).hexdigest()
    with pytest.raises(PilotError) as err:
        tool().get(f"{base}/f", tmp_path / "f", checksum=f"{checksum}:{value}", timeout=10)
    assert err.value.code == code
    assert not (tmp_path / "f").exists() and not (tmp_path / ".f.part").exists()


def test_get_slow_server_times_out(storage, tmp_path: Path) -> None:
    store, base = storage
    store.files["/slow"] = DATA
    store.mode = "slow"
    start = time.monotonic()
    with pytest.raises(PilotError) as err:
        tool().get(f"{base}/slow", tmp_path / "slow", timeout=1.0)
    assert err.value.code == ErrorCode.STAGEINTIMEOUT
    assert time.monotonic() - start < 15  # bounded by the budget, not by the server
    assert not (tmp_path / ".slow.part").exists()


def test_server_down(tmp_path: Path) -> None:
    src = tmp_path / "out.root"
    src.write_bytes(DATA)
    url = dead_url()
    with pytest.raises(PilotError) as err:
        tool(retries=1).get(f"{url}/x", tmp_path / "x", timeout=10)
    assert err.value.code == ErrorCode.STAGEINFAILED
    assert "2 attempts" in err.value.detail
    with pytest.raises(PilotError) as err:
        tool(retries=1).put(src, f"{url}/x", timeout=10)
    assert err.value.code == ErrorCode.STAGEOUTFAILED


def test_transient_errors_are_retried(storage, tmp_path: Path) -> None:
    store, base = storage
    store.files["/f"] = DATA
    store.mode, store.flaky_left = "flaky", 2
    result = tool(retries=2).get(f"{base}/f", tmp_path / "f", timeout=20)
    assert result.size == len(DATA)
    assert store.requests.count("GET /f") == 3


def test_put_verified_by_server_digest(storage, tmp_path: Path) -> None:
    store, base = storage
    src = tmp_path / "out.root"
    src.write_bytes(DATA)
    result = tool(token=TOKEN).put(src, f"{base}/scope/out.root", timeout=20)
    assert store.files["/scope/out.root"] == DATA
    assert result.adler32 == adler(DATA) and result.size == len(DATA)
    assert "HEAD /scope/out.root" in store.requests


def test_put_creates_parent_collections(storage, tmp_path: Path) -> None:
    store, base = storage
    store.mode = "strict"
    src = tmp_path / "o"
    src.write_bytes(b"abc")
    tool().put(src, f"{base}/a/b/o", timeout=20)
    assert store.files["/a/b/o"] == b"abc"
    assert {"/a/", "/a/b/"} <= store.collections


def test_put_corrupted_by_storage_is_1172(storage, tmp_path: Path) -> None:
    store, base = storage
    store.mode = "corrupt_put"
    src = tmp_path / "o"
    src.write_bytes(DATA)
    with pytest.raises(PilotError) as err:
        tool().put(src, f"{base}/o", timeout=20)
    assert err.value.code == ErrorCode.PUTADMISMATCH


def test_put_slow_server_times_out(storage, tmp_path: Path) -> None:
    store, base = storage
    store.mode = "slowput"
    src = tmp_path / "o"
    src.write_bytes(DATA)
    with pytest.raises(PilotError) as err:
        tool().put(src, f"{base}/o", timeout=1.0)
    assert err.value.code == ErrorCode.STAGEOUTTIMEOUT


def test_put_missing_source(storage, tmp_path: Path) -> None:
    _, base = storage
    with pytest.raises(PilotError) as err:
        tool().put(tmp_path / "absent", f"{base}/o", timeout=5)
    assert err.value.code == ErrorCode.MISSINGOUTPUTFILE


def test_token_not_sent_over_plain_http_to_other_hosts() -> None:
    t = tool(token=TOKEN)
    assert "Authorization" not in t._headers("http://storage.example.org/f")
    assert t._headers("https://storage.example.org/f")["Authorization"].endswith(TOKEN)
    assert redact_url("https://u:p@h/f?authz=XYZ&a=1") == "https://h/f?authz=***&a=***"


def test_traces_arrive_for_each_transfer(storage, traces, tmp_path: Path, caplog) -> None:
    store, base = storage
    received, trace_url = traces
    store.files["/s/in1"] = DATA
    job = Job.from_panda(
        {
            "PandaID": "4242",
            "taskID": "77",
            "transformation": "run.sh",
            "inFiles": "in1,in2",
            "scopeIn": "s",
            "GUID": "g1,g2",
            "realDatasetsIn": "ds1,ds1",
            "prodSourceLabel": "user",
        }
    )
    sender = TraceSender.for_workdir(trace_url, tmp_path, timeout=5)
    copytool = tool(token=TOKEN)
    caplog.set_level(logging.DEBUG)
    codes = []
    for spec in job.in_files:
        trace = Trace.for_file(job, spec, "get", local_site="TEST_QUEUE", protocol="http")
        url = f"{base}/{spec.scope}/{spec.lfn}?authz={TOKEN}"
        try:
            result = copytool.get(url, tmp_path / spec.lfn, timeout=10)
            trace.done(result.size, url)
        except PilotError as exc:
            codes.append(exc.code)
            trace.failed(exc)
        assert sender.send(trace)
    assert codes == [ErrorCode.MISSINGINPUTFILE]
    assert [t["clientState"] for t in received] == ["DONE", "STAGEIN_ATTEMPT_FAILED"]
    first = received[0]
    assert first["eventType"] == "get_sm_a" and first["appid"] == "4242" and first["taskid"] == "77"
    assert first["filename"] == "in1" and first["filesize"] == len(DATA) and first["scope"] == "s"
    assert first["url"].endswith("/s/in1") and len(first["usr"]) == 32
    assert "Input file is missing" in received[1]["stateReason"]
    assert TOKEN not in json.dumps(received) and TOKEN not in caplog.text
    assert not (tmp_path / "unsent_traces.jsonl").exists()


def test_trace_server_down_is_not_fatal_and_kept(tmp_path: Path, traces) -> None:
    received, trace_url = traces
    spec = FileSpec(lfn="out1", kind="output", scope="s")
    sender = TraceSender.for_workdir(f"{dead_url()}/traces/", tmp_path, timeout=2)
    trace = Trace.for_file(None, spec, "put", local_site="Q").done(10)
    assert sender.send(trace) is False
    kept = (tmp_path / "unsent_traces.jsonl").read_text().splitlines()
    assert json.loads(kept[0])["eventType"] == "put_sm"
    sender.url = trace_url  # the server is back: replay the record
    assert sender.resend() == 1
    assert received[0]["uuid"] == trace.uuid
    assert (tmp_path / "unsent_traces.jsonl").read_text() == ""


def test_staging_with_http_sends_a_trace_per_transfer(storage, traces, tmp_path: Path) -> None:
    store, base = storage
    received, trace_url = traces
    store.files["/mc/in1"] = DATA
    store.files["/mc/in2"] = DATA[:1000]
    job = Job.from_panda(
        {
            "PandaID": "77",
            "transformation": "run.sh",
            "inFiles": "in1,in2",
            "scopeIn": "mc",
            "checksum": f"ad:{adler(DATA)},ad:{adler(DATA[:1000])}",
            "outFiles": "out1",
            "scopeOut": "mc",
        }
    )
    copytool = make_copytool("http", discover_token=False, backoff=0.05)
    sink = TraceSink(TraceSender.for_workdir(trace_url, tmp_path, 5), job, local_site="Q")
    stage_in(job, tmp_path, copytool, base, sink=sink, timeout=20)
    (tmp_path / "out1").write_bytes(b"result")
    stage_out(job.out_files, tmp_path, copytool, f"{base}/out", sink=sink, timeout=20)
    assert store.files["/out/mc/out1"] == b"result"
    assert [(t["eventType"], t["filename"], t["clientState"]) for t in received] == [
        ("get_sm", "in1", "DONE"),
        ("get_sm", "in2", "DONE"),
        ("put_sm", "out1", "DONE"),
    ]
    assert all(t["protocol"] == "http" and t["appid"] == "77" for t in received)


def test_truncated_download_is_retried_then_fails(storage, tmp_path: Path) -> None:
    store, base = storage
    store.files["/t"] = DATA
    store.mode = "truncate"
    with pytest.raises(PilotError) as err:
        tool(retries=1).get(f"{base}/t", tmp_path / "t", timeout=20)
    assert err.value.code == ErrorCode.STAGEINFAILED
    assert store.requests.count("GET /t") == 2
    assert not list(tmp_path.iterdir())
