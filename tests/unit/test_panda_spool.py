"""The spool on its own: durable files, order, refusals kept, one flusher at a time."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pilot.comm.panda import ServerReply
from pilot.comm.spool import Spool
from pilot.errors import ErrorCode, PilotError


@dataclass
class RecordingClient:
    """Stands in for the server's answers, which a spool test decides."""

    answers: list[Any]
    sent: list[tuple[str, dict]] = field(default_factory=list)

    def post(self, method: str, data: dict[str, Any]) -> ServerReply:
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        self.sent.append((method, data))
        return answer


OK = ServerReply(200, {"StatusCode": 0})
UNKNOWN_JOB = ServerReply(200, {"StatusCode": 30, "errorDialog": "job not found"})
DOWN = ServerReply(503, {"StatusCode": 30})
BAD_TOKEN = ServerReply(403, {"StatusCode": 50})


def test_put_is_durable_and_ordered(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "sp")
    ids = [spool.put("updateJob", {"jobId": i, "state": "finished"}) for i in range(5)]
    assert ids == sorted(ids)
    again = Spool(tmp_path / "sp")  # a new pilot process
    assert [e.fields["jobId"] for e in again.pending()] == [0, 1, 2, 3, 4]
    assert not list((tmp_path / "sp").glob(".*.tmp"))


def test_flush_stops_on_transient_failure_and_keeps_order(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    for i in range(4):
        spool.put("updateJob", {"jobId": i})
    failure = PilotError(ErrorCode.COMMUNICATIONFAILURE, "down")
    client = RecordingClient([OK, failure])
    assert spool.flush(client) == (1, 3)
    assert [e.fields["jobId"] for e in spool.pending()] == [1, 2, 3]
    client = RecordingClient([OK, DOWN])
    assert spool.flush(client) == (1, 2)
    client = RecordingClient([BAD_TOKEN])
    assert spool.flush(client) == (0, 2)  # a token problem is fixable: kept
    client = RecordingClient([UNKNOWN_JOB, OK])
    assert spool.flush(client) == (1, 0)
    assert [e.fields["jobId"] for e in spool.rejected()] == [2]


def test_corrupt_file_is_moved_aside(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.put("updateJob", {"jobId": 1})
    (tmp_path / "00000000000000000001-deadbeef.json").write_text('{"id": "x", "meth')
    assert [e.fields["jobId"] for e in spool.pending()] == [1]
    assert (tmp_path / "rejected" / "00000000000000000001-deadbeef.json").is_file()


def test_one_flusher_at_a_time(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.put("updateJob", {"jobId": 1})
    with spool._locked() as mine:
        assert mine
        assert Spool(tmp_path).flush(RecordingClient([OK])) == (0, 1)
    assert spool.flush(RecordingClient([OK])) == (1, 0)


def test_missing_spool_dir_flushes_nothing(tmp_path: Path) -> None:
    assert Spool(tmp_path / "none").flush(RecordingClient([])) == (0, 0)


def test_entry_file_format(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    entry_id = spool.put("updateJob", {"jobId": 7, "state": "failed"})
    record = json.loads((tmp_path / f"{entry_id}.json").read_text())
    assert record["method"] == "updateJob" and record["fields"] == {"jobId": 7, "state": "failed"}
