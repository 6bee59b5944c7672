"""The client's choice of API and its answers to the servers' quirks, against `pilot serve`.

- auto: /api/v1 first; a server that answers 403 "is forbidden" for it is an
  old one, and the client falls back to the legacy calls once for the run;
- v1 ``update_event_ranges`` answers HTTP 500 after writing (panda-server
  1.0.4): the client asks the ranges' statuses and resends nothing recorded;
- the legacy ``updateEventRanges`` appends one ``False`` when its loop ends
  in an exception (9 answers for 8 ranges): the statuses decide too.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from wsgiref.simple_server import WSGIRequestHandler, make_server

import pytest

from pilot.comm.panda import PandaClient
from pilot.comm.pandaapi import Api
from pilot.errors import ErrorCode, PilotError
from pilot.server.serve import EmbeddedServer


def _task(server: EmbeddedServer, n: int = 8) -> int:
    (pid,) = server.load_task({"job": {"transformation": "x"}, "nRanges": n, "jediTaskID": 5})[
        "PandaIDs"
    ]
    return pid


def _finish_all(client: PandaClient, pid: int, n: int = 8) -> tuple[list[dict], list[bool]]:
    assert client.get_job("Q") is not None
    ranges = client.get_event_ranges(pid, 0, 5, n)
    assert len(ranges) == n
    entries = [
        {"eventRangeID": r["eventRangeID"], "eventStatus": "finished" if i % 4 else "failed"}
        for i, r in enumerate(ranges)
    ]
    return entries, client.update_event_ranges(entries)


def _accepted_updates(server: EmbeddedServer) -> list[int]:
    rows = server.store.query(
        "SELECT range_id, COUNT(*) AS n FROM range_updates WHERE accepted = 1 GROUP BY range_id"
    )
    return [r["n"] for r in rows]


def test_auto_falls_back_to_legacy_once_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with EmbeddedServer(tmp_path / "s.db", legacy_only=True) as server:
        pid = _task(server)
        client = PandaClient(server.url, token=server.token, retries=0)
        assert client.api is Api.AUTO and client.api_in_use is Api.V1
        with caplog.at_level(logging.WARNING, logger="pilot.comm.panda"):
            entries, answers = _finish_all(client, pid)
            client.update_job({"jobId": pid, "state": "finished", "attemptNr": 1})
        assert client.api_in_use is Api.LEGACY
        assert answers == [True] * 8
        fallbacks = [r for r in caplog.records if "legacy API" in r.getMessage()]
        assert len(fallbacks) == 1 and "is forbidden" in fallbacks[0].getMessage()
        assert server.final_records(pid)[0]["fields"]["state"] == "finished"


def test_explicit_v1_against_an_old_server_is_a_clear_error(tmp_path: Path) -> None:
    with EmbeddedServer(tmp_path / "s.db", legacy_only=True) as server:
        server.load_jobs({"transformation": "x"})
        with pytest.raises(PilotError) as err:
            PandaClient(server.url, token=server.token, retries=0, api="v1").get_job("Q")
        assert err.value.code == ErrorCode.COMMUNICATIONFAILURE
        assert "legacy" in err.value.detail and "forbidden" in err.value.detail
    with pytest.raises(PilotError) as err:
        PandaClient("http://127.0.0.1:9", api="v2")
    assert "v1, legacy or auto" in err.value.detail


def test_update_event_ranges_500_after_the_write_is_not_resent(tmp_path: Path) -> None:
    quirk = {"update_event_ranges_500"}
    with EmbeddedServer(tmp_path / "s.db", quirks=quirk) as server:
        pid = _task(server)
        client = PandaClient(server.url, token=server.token, retries=3, backoff=0.01)
        entries, answers = _finish_all(client, pid)
        assert answers == [True] * 8
        assert _accepted_updates(server) == [1] * 8  # each range sent once, not 4 times
        assert server.store.range_counts(pid) == {"finished": 6, "failed": 2}
        # a range the server never dispatched to this job: not recorded, answered False
        again = client.update_event_ranges(entries[:1] + [{**entries[1], "eventRangeID": "x"}])
        assert again == [True, False]  # the first one is recorded (once), the bogus one not


class _ExtraFalse:
    """0.8.1's legacy updateEventRanges after an exception past its loop: one more False."""

    def __init__(self, app) -> None:
        self.app = app

    def __call__(self, environ, start_response):
        if environ.get("PATH_INFO") != "/server/panda/updateEventRanges":
            return self.app(environ, start_response)
        captured: list = []
        body = b"".join(self.app(environ, lambda status, headers: captured.append(status)))
        answer = json.loads(body)
        answer["Returns"] = answer["Returns"] + [False]
        out = json.dumps(answer).encode()
        start_response(captured[0], [("Content-Type", "text/plain")])
        return [out]


class _Quiet(WSGIRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def extra_false_server(tmp_path: Path) -> Iterator[tuple[EmbeddedServer, str]]:
    from pilot.server.app import DispatcherApp

    with EmbeddedServer(tmp_path / "s.db", legacy_only=True) as server:
        app = DispatcherApp(server.store, token=server.token, legacy_only=True)
        httpd = make_server("127.0.0.1", 0, _ExtraFalse(app), handler_class=_Quiet)
        thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.2})
        thread.start()
        try:
            yield server, f"http://127.0.0.1:{httpd.server_address[1]}"
        finally:
            httpd.shutdown()
            thread.join(10)
            httpd.server_close()


def test_legacy_extra_false_answer_is_checked_not_resent(
    extra_false_server: tuple[EmbeddedServer, str],
) -> None:
    server, url = extra_false_server
    pid = _task(server)
    client = PandaClient(url, token=server.token, retries=0, api="legacy")
    entries, answers = _finish_all(client, pid)
    assert answers == [True] * 8  # not "8 refused", not a length error
    assert _accepted_updates(server) == [1] * 8
    # a second, identical report: recorded already, so nothing is accepted again
    assert client.update_event_ranges(entries) == [True] * 8
    assert sum(_accepted_updates(server)) == 8


def test_running_updates_answered_none_count_as_taken(tmp_path: Path) -> None:
    with EmbeddedServer(tmp_path / "s.db") as server:
        pid = _task(server, 2)
        client = PandaClient(server.url, token=server.token, retries=0, api="v1")
        client.get_job("Q")
        ranges = client.get_event_ranges(pid, 0, 5, 2)
        running = [{"eventRangeID": r["eventRangeID"], "eventStatus": "running"} for r in ranges]
        assert client.update_event_ranges(running) == [True, True]


def test_spool_written_against_an_old_server_is_delivered_to_a_current_one(
    tmp_path: Path,
) -> None:
    from pilot.comm.panda import PandaUpstream
    from pilot.comm.spool import Spool
    from pilot.job import Job

    db = tmp_path / "s.db"
    old = EmbeddedServer(db, legacy_only=True).start()
    port, token = old.port, old.token
    (pid,) = old.load_jobs({"transformation": "x"})
    client = PandaClient(old.url, token=token, retries=0)
    upstream = PandaUpstream(client, Spool(tmp_path / "spool"), site_name="Q", node="n1")
    job = Job.from_panda(client.get_job("Q"))
    assert client.api_in_use is Api.LEGACY
    old.stop()  # gone before the final update: spooled
    final = {"state": "finished", "pilotErrorCode": 0, "startTime": "2026-01-01 00:00:00"}
    assert upstream.final_update(job, final) is False
    current = EmbeddedServer(db, port=port, token=token).start()  # upgraded in the meantime
    try:
        fresh = PandaClient(current.url, token=token, retries=0)  # the next pilot's client
        assert PandaUpstream(fresh, upstream.spool).flush() == (1, 0)
        assert fresh.api_in_use is Api.V1
        (record,) = current.final_records(pid)
        assert record["fields"]["state"] == "finished"
        assert record["fields"]["startTime"] == "2026-01-01 00:00:00"
        assert "timestamp" not in record["fields"]  # went over v1, which has no such parameter
    finally:
        current.stop()
