"""The in-process transport: priority of control, failure events, garbage dropped."""

from __future__ import annotations

import os
import threading

import pytest

from hpc.transport import TAG_OF, Backoff, Envelope, Kind, LocalHub, PeerFailed, Tag


def test_every_kind_has_a_tag_and_control_is_first():
    assert set(TAG_OF) == set(Kind)
    assert TAG_OF[Kind.STOP] is Tag.CONTROL
    assert TAG_OF[Kind.UPDATE] is not Tag.CONTROL
    assert min(Tag) is Tag.CONTROL


def test_control_overtakes_queued_data():
    hub = LocalHub(2)
    yoda, droid = hub.endpoint(0), hub.endpoint(1)
    for i in range(100):
        droid.send(0, Envelope(Kind.UPDATE, seq=i, body=[]))
    droid.send(0, Envelope(Kind.BYE, seq=100))
    first = yoda.recv(0)
    assert isinstance(first, Envelope) and first.kind is Kind.BYE and first.source == 1
    seqs = [yoda.recv(0).seq for _ in range(100)]
    assert seqs == list(range(100))
    assert yoda.recv(0) is None


def test_recv_blocks_until_a_message_arrives():
    hub = LocalHub(2)
    yoda, droid = hub.endpoint(0), hub.endpoint(1)
    threading.Timer(0.05, lambda: droid.send(0, Envelope(Kind.HB))).start()
    got = yoda.recv(5.0)
    assert isinstance(got, Envelope) and got.kind is Kind.HB


def test_kill_reports_the_dead_rank_once_and_drops_later_messages():
    hub = LocalHub(3)
    yoda, d1 = hub.endpoint(0), hub.endpoint(1)
    d1.send(0, Envelope(Kind.UPDATE))
    hub.kill(1)
    assert yoda.recv(0) == PeerFailed(1)
    late = yoda.recv(0)  # sent before it died: still delivered, as over MPI
    assert isinstance(late, Envelope) and late.kind is Kind.UPDATE
    d1.send(0, Envelope(Kind.HB))
    assert yoda.recv(0) is None
    hub.kill(1)
    assert yoda.recv(0) is None


def test_garbage_on_the_wire_is_not_an_envelope():
    assert Envelope.from_wire("junk", 1) is None
    assert Envelope.from_wire((99, 0, 0, None), 1) is None
    assert Envelope.from_wire((1, "x", 0, None), 1) is None
    env = Envelope.from_wire((int(Kind.WORK), 3, 2, {"a": 1}), 4)
    assert env == Envelope(Kind.WORK, 3, 2, {"a": 1}, 4)


def test_bad_rank():
    with pytest.raises(ValueError):
        LocalHub(2).endpoint(2)


def test_backoff_sleep_wakes_up_for_another_source_of_work():
    r, w = os.pipe()
    try:
        b = Backoff(minimum=0.001, maximum=0.004)
        assert b.sleep(0.01, wake=r) is False  # nothing to read: a plain sleep, backing off
        assert b.current > b.minimum
        os.write(w, b"x")
        assert b.sleep(10.0, wake=r) is True  # readable: back at once, backoff reset
        assert b.current == b.minimum
    finally:
        os.close(r)
        os.close(w)
