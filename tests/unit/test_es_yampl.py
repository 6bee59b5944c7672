"""The pilot's end of yampl's LOCAL transport, driven by clients that connect as yampl's does.

A yampl client is a ZeroMQ DEALER with no identity of its own, connected to
``ipc:///tmp/zmq_<channel>``, one frame per message. These clients are plain
pyzmq DEALERs doing exactly that; ``tests/integration/test_es_real_yampl.py``
uses the real library.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
import zmq

from pilot.errors import ErrorCode, PilotError
from pilot.eventservice.executor import EventExecutor
from pilot.eventservice.messages import range_message
from pilot.eventservice.model import RangeStatus
from pilot.eventservice.yampl import (
    MAX_MESSAGE,
    RangeChannel,
    socket_path,
    unique_channel_name,
)
from pilot.job import EventRange, Job


@pytest.fixture
def channel():
    ch = RangeChannel(unique_channel_name())
    yield ch
    ch.close()


@pytest.fixture
def context():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def dealer(ctx: zmq.Context, name: str) -> zmq.Socket:
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(f"ipc:///tmp/zmq_{name}")
    return s


def receive_all(ch: RangeChannel, n: int, rounds: int = 50) -> list:
    got: list = []
    for _ in range(rounds):
        got += ch.receive(0.1)
        if len(got) >= n:
            break
    return got


def test_socket_file_is_under_tmp_and_removed_on_close():
    name = unique_channel_name()
    assert name.startswith(f"EventService_EventRanges_{os.getpid()}_")
    assert name != unique_channel_name()
    stale = socket_path(name)
    stale.write_text("left over from a crashed pilot")
    ch = RangeChannel(name)
    assert stale.is_socket()
    ch.close()
    assert not stale.exists()


def test_one_frame_each_way_exact_bytes_and_a_trailing_nul_dropped(channel, context):
    c = dealer(context, channel.name)
    c.send(b"Ready for events\0")  # yampl's own Python binding appends a NUL
    (msg,) = receive_all(channel, 1)
    assert msg.text == "Ready for events"
    long_range = "[" + json.dumps({"eventRangeID": "1-2-3-4-5", "PFN": "/d/" + "f" * 400}) + "]"
    assert len(long_range) > 255  # a ZMTP long frame
    assert channel.send(msg.peer, long_range) and channel.send(msg.peer, "No more events")
    assert c.poll(5000) and c.recv_multipart() == [long_range.encode()]
    assert c.poll(5000) and c.recv_multipart() == [b"No more events"]


def test_client_that_starts_before_the_pilot_binds(context):
    name = unique_channel_name()
    c = dealer(context, name)
    c.send(b"Ready for events")  # queued in the client until the server is there
    time.sleep(0.3)
    with RangeChannel(name) as ch:
        (msg,) = receive_all(ch, 1)
        assert msg.text == "Ready for events"
        assert ch.send(msg.peer, "No more events")
        assert c.poll(5000) and c.recv() == b"No more events"


def test_unreadable_messages_are_refused_with_a_reason(channel, context):
    c = dealer(context, channel.name)
    c.send(b"\xff\xfe not text")
    c.send(b"x" * (2 * MAX_MESSAGE))
    c.send_multipart([b"two", b"frames"])
    c.send(b"")
    got = receive_all(channel, 4)
    assert [m.text for m in got] == [None] * 4
    assert "UTF-8" in got[0].error and "limit" in got[1].error
    assert "one frame" in got[2].error and "empty" in got[3].error


def test_reply_to_a_peer_that_has_gone_is_refused_not_lost(channel):
    assert not channel.send(b"\x00nobody", "No more events")


def test_bad_channel_names_are_refused():
    for bad in ("../x", "a/b", "", "x" * 200):
        with pytest.raises(PilotError):
            RangeChannel(bad)


def test_a_range_athenamp_would_misread_is_refused():
    good = EventRange("1-2-3-4-5", 1, 2, "EVNT.root", "guid")
    text = range_message(good, "/data/EVNT.root")
    assert json.loads(text) == [
        {
            "eventRangeID": "1-2-3-4-5",
            "startEvent": 1,
            "lastEvent": 2,
            "LFN": "EVNT.root",
            "GUID": "guid",
            "PFN": "/data/EVNT.root",
            "scope": "",
        }
    ]
    assert text.endswith("}]")
    for pfn in ("/data/a,b.root", '/data/"q".root', "/data/a\nb", " /data/x"):
        with pytest.raises(PilotError) as err:
            range_message(good, pfn)
        assert err.value.code == ErrorCode.ESRECOVERABLE and "PFN" in err.value.detail
    with pytest.raises(PilotError):
        range_message(EventRange("1-2-3-4-5", 1, 2, "EVNT.root", "g,uid"), "/d/f")


# -- the executor against scripted payloads ---------------------------------------

SCRIPTED = """
import json, re, sys, time, zmq
name = re.search(r'EventRangeChannel="([^"]+)"', " ".join(sys.argv)).group(1)
s = zmq.Context().socket(zmq.DEALER); s.setsockopt(zmq.LINGER, 2000)
s.connect("ipc:///tmp/zmq_" + name)
def recv():
    if not s.poll(20000):
        sys.exit("no answer")
    return s.recv()
"""


def run_script(tmp_path: Path, body: str, ranges: list[EventRange], **kw) -> tuple:
    script = tmp_path / "payload.py"
    script.write_text(SCRIPTED + body)
    job = Job.from_panda(
        {
            "PandaID": 7,
            "taskID": 3,
            "jobsetID": 2,
            "transformation": sys.executable,
            "jobPars": str(script),
            "eventService": "True",
        }
    )
    ex = EventExecutor(job, tmp_path / "w", mode="protocol", **kw)
    ex.start()
    ex.add_ranges(ranges)
    ex.no_more_ranges()
    results: list = []
    for _ in range(300):
        results += ex.poll(0.5)
        if ex.finished or ex.error is not None:
            break
    return ex, {r.event_range_id: r for r in results}


def ranges(n: int) -> list[EventRange]:
    return [EventRange(f"3-7-1-{i}-0", i + 1, i + 1, "EVNT.root", "g") for i in range(n)]


def test_three_workers_interleave_requests_and_reports_on_one_dealer(tmp_path):
    body = """
outs = {}
for _ in range(3):
    s.send(b"Ready for events")      # three workers ask before anyone reports
held = [json.loads(recv())[0] for _ in range(3)]
for r in held[1:]:
    open(r["eventRangeID"] + ".out", "w").write("x")
    s.send(("%s/%s.out,ID:%s,CPU:N/A,WALL:N/A" % (sys.path[0] or ".", r["eventRangeID"], r["eventRangeID"])).encode())
    s.send(b"Ready for events")
extra = [json.loads(recv())[0] for _ in range(2)]
for r in [held[0]] + extra:
    open(r["eventRangeID"] + ".a", "w").write("a"); open(r["eventRangeID"] + ".b", "w").write("b")
    rid = r["eventRangeID"]
    s.send(("{0}/{1}.a,{0}/{1}.b,ID:{1},CPU:1.5,WALL:2".format(".", rid)).encode())
for _ in range(3):
    s.send(b"Ready for events")
assert recv() == b"No more events"
time.sleep(0.5)
assert not s.poll(0), "No more events came twice"
"""
    ex, results = run_script(tmp_path, body.replace('sys.path[0] or "."', '"."'), ranges(5))
    assert ex.finished and ex.error is None, ex.error
    assert sorted(results) == [f"3-7-1-{i}-0" for i in range(5)]
    assert all(r.status is RangeStatus.FINISHED for r in results.values())
    assert ex.bad_messages == 0


def test_mtes_payload_gets_pfn_and_exact_no_more(tmp_path):
    body = """
s.send(b"Ready for events")
raw = recv()
assert not raw.endswith(b"\\0") and not raw.endswith(b"\\n")
r = json.loads(raw)[0]
assert r["PFN"] == r["LFN"] or r["PFN"].endswith("/EVNT.root"), r
open("o.pool.root", "w").write("x")
s.send(("o.pool.root,ID:%s,CPU:N/A,WALL:N/A" % r["eventRangeID"]).encode())
s.send(b"Ready for events")
assert recv() == b"No more events"
"""
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "EVNT.root").write_text("input")
    ex, results = run_script(tmp_path, body, ranges(1))
    assert ex.finished and results["3-7-1-0-0"].status is RangeStatus.FINISHED
    assert results["3-7-1-0-0"].cpu == 0.0 and results["3-7-1-0-0"].wall == 0.0


def test_process_and_parse_errors_end_the_right_range(tmp_path):
    body = """
s.send(b"Ready for events"); s.send(b"Ready for events")
a, b = (json.loads(recv())[0] for _ in range(2))
s.send(("ERR_ATHENAMP_PROCESS %s: Not found in the input file" % a["eventRangeID"]).encode())
text = json.dumps(b)[2:-2]
s.send(('ERR_ATHENAMP_PARSE "%s": Wrong format' % text).encode())
s.send(b"Ready for events")
assert recv() == b"No more events"
"""
    ex, results = run_script(tmp_path, body, ranges(2))
    assert ex.finished
    a, b = results["3-7-1-0-0"], results["3-7-1-1-0"]
    assert a.status is RangeStatus.FAILED and a.error_code == ErrorCode.ESRECOVERABLE
    assert "Not found in the input file" in a.error_diag
    assert b.status is RangeStatus.FATAL and b.error_code == ErrorCode.ESFATAL
    assert "Wrong format" in b.error_diag


def test_payload_killed_mid_range_fails_it_and_is_restarted(tmp_path):
    body = """
import os, signal
s.send(b"Ready for events")
r = json.loads(recv())[0]
if r["eventRangeID"] == "3-7-1-0-0":
    os.kill(os.getpid(), signal.SIGKILL)
open("o", "w").write("x")
s.send(("o,ID:%s,CPU:1,WALL:1" % r["eventRangeID"]).encode())
s.send(b"Ready for events")
assert recv() == b"No more events"
"""
    ex, results = run_script(tmp_path, body, ranges(2))
    assert ex.finished and ex.restarts == 1
    dead = results["3-7-1-0-0"]
    assert dead.status is RangeStatus.FAILED and dead.error_code == ErrorCode.ESRECOVERABLE
    assert "SIGKILL" in dead.error_diag or "signal 9" in dead.error_diag
    assert results["3-7-1-1-0"].status is RangeStatus.FINISHED


def test_no_report_after_no_more_fails_what_is_left_with_1317(tmp_path):
    body = """
s.send(b"Ready for events")
r = json.loads(recv())[0]
s.send(b"Ready for events")
assert recv() == b"No more events"
time.sleep(60)
"""
    ex, results = run_script(tmp_path, body, ranges(1), final_wait=1.0)
    assert ex.finished and ex.error is None
    left = results["3-7-1-0-0"]
    assert left.status is RangeStatus.FAILED and left.error_code == ErrorCode.EXCEEDEDMAXWAITTIME
    assert ex.payload.poll() is not None


def test_two_payloads_on_one_node_never_share_a_channel(tmp_path):
    job = Job.from_panda(
        {
            "PandaID": 7,
            "taskID": 3,
            "transformation": sys.executable,
            "jobPars": "-m pilot.payloads.toysim",
            "eventService": "True",
        }
    )
    a = EventExecutor(job, tmp_path / "a")
    b = EventExecutor(job, tmp_path / "b")
    try:
        a.start()
        b.start()
        assert a.channel_name != b.channel_name
        assert socket_path(a.channel_name).is_socket() and socket_path(b.channel_name).is_socket()
    finally:
        names = [a.channel_name, b.channel_name]
        a.stop(0.5)
        b.stop(0.5)
    assert not any(socket_path(n).exists() for n in names)
