"""Payload messages and the ERR_ mapping."""

from __future__ import annotations

from pilot.eventservice.messages import (
    BadMessage,
    DoneMessage,
    ErrorMessage,
    ReadyMessage,
    parse_message,
)
from pilot.eventservice.model import RangeStatus


def test_ready():
    assert parse_message("Ready for events") == ReadyMessage()


def test_done_with_one_and_several_outputs():
    m = parse_message("/w/out.pool.root,ID:1-2-3-4-5,CPU:1.5,WALL:2")
    assert m == DoneMessage("1-2-3-4-5", ["/w/out.pool.root"], 1.5, 2.0)
    m = parse_message("/w/a,/w/b,ID:1-2-3-4-5,CPU:x,WALL:-1")
    assert isinstance(m, DoneMessage) and m.paths == ["/w/a", "/w/b"]
    assert m.cpu == 0.0 and m.wall == 0.0


def test_err_mapping():
    fatal = parse_message("ERR_TE_FATAL 1-2-3-4-5: the transform broke")
    assert isinstance(fatal, ErrorMessage)
    assert fatal.status is RangeStatus.FATAL and fatal.code == 1228
    assert fatal.diag == "the transform broke"
    parse = parse_message("ERR_ATHENAMP_PARSE 1-2-3-4-5: bad")
    assert parse.status is RangeStatus.FATAL and parse.code == 1228
    other = parse_message("ERR_ATHENAMP_PROCESS 1-2-3-4-5: failed to process event")
    assert other.status is RangeStatus.FAILED and other.code == 1224


def test_garbage_is_a_bad_message():
    for text in ("hello", "ERR_", ",ID:1-2-3-4-5,CPU:1,WALL:1", ""):
        assert isinstance(parse_message(text), BadMessage)
