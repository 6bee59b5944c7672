"""Trace records: PanDA's field names, event types, states, and a sender that never raises."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

from pilot.data.staging import TransferEvent
from pilot.data.traces import Trace, TraceSender, TraceSink
from pilot.errors import ErrorCode, PilotError
from pilot.job import FileSpec, Job

PANDA_FIELDS = (
    "eventType eventVersion clientState stateReason protocol localSite remoteSite timeStart "
    "transferStart validateStart timeEnd dataset scope filename guid filesize usr appid "
    "hostname ip suspicious url uuid taskid pq"
).split()


def job(label: str = "managed") -> Job:
    return Job.from_panda(
        {"PandaID": "9", "taskID": "3", "transformation": "x", "prodSourceLabel": label}
    )


def test_field_names_are_pandas() -> None:
    assert [f.name for f in fields(Trace)] == PANDA_FIELDS
    assert list(Trace().to_dict()) == PANDA_FIELDS


def test_event_types_and_states() -> None:
    spec = FileSpec(lfn="a.root", kind="input", scope="mc", guid="G", fsize=5, dataset="ds")
    t = Trace.for_file(job(), spec, "get", local_site="Q", protocol="http")
    assert (t.eventType, t.appid, t.taskid, t.filename, t.guid, t.pq) == (
        "get_sm", "9", "3", "a.root", "G", "Q",
    )  # fmt: skip
    assert Trace.for_file(job("user"), spec, "put").eventType == "put_sm_a"
    t.failed(PilotError(ErrorCode.STAGEINTIMEOUT, "slow"))
    assert t.clientState == "STAGEIN_ATTEMPT_FAILED" and "timed out" in t.stateReason
    out = Trace.for_file(None, spec, "put").failed("disk full")
    assert out.clientState == "STAGEOUT_ATTEMPT_FAILED" and out.timeEnd is not None
    done = Trace.for_file(None, spec, "get").done(7, "https://h/p?token=abc")
    assert done.clientState == "DONE" and done.filesize == 7 and done.url == "https://h/p"


def test_from_staging_event_through_a_sink(tmp_path: Path) -> None:
    spec = FileSpec(lfn="o.root", kind="output", scope="user.x")
    event = TransferEvent(
        "put", spec, "https://u:pw@store/o.root?sig=1", "http", "DONE", time_start=1.0,
        transfer_start=2.0, validate_start=3.0, time_end=4.0, size=11,
    )  # fmt: skip
    sender = TraceSender("", unsent=tmp_path / "unsent.jsonl")
    TraceSink(sender, job("user"), local_site="Q")(event)
    kept = json.loads((tmp_path / "unsent.jsonl").read_text())
    assert kept["eventType"] == "put_sm_a" and kept["clientState"] == "DONE"
    assert kept["url"] == "https://store/o.root" and kept["filesize"] == 11
    assert (kept["timeStart"], kept["timeEnd"]) == (1.0, 4.0)


def test_unwritable_unsent_file_is_only_logged(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    sender = TraceSender("", unsent=blocker / "sub" / "unsent.jsonl")
    assert sender.send(Trace()) is False


def test_a_replay_takes_the_spool_so_appends_meanwhile_are_kept(tmp_path: Path) -> None:
    """Droids share a spool: what another process appends during a replay is not lost,
    and a second replay finds nothing of the first one's to send again."""
    spool = tmp_path / "unsent.jsonl"
    spool.write_text('{"filename": "a"}\n{"filename": "b"}\n')
    posted: list[str] = []

    class Session:
        def post(self, url, data, headers, timeout, **kw):
            posted.append(json.loads(data)["filename"])
            with open(spool, "a") as fh:  # another droid keeps a trace meanwhile
                fh.write(json.dumps({"filename": f"new{len(posted)}"}) + "\n")
            return type("R", (), {"status_code": 201, "close": lambda self: None})()

    sender = TraceSender("http://127.0.0.1:9/traces/", unsent=spool, session=Session())
    assert sender.resend() == 2 and posted == ["a", "b"]
    assert [json.loads(x)["filename"] for x in spool.read_text().splitlines()] == ["new1", "new2"]
    assert not list(tmp_path.glob("*.replay"))
