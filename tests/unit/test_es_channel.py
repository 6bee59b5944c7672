"""The pilot's side of the payload channel: framing, hang-up, reconnection."""

from __future__ import annotations

import socket

import pytest

from pilot.eventservice.channel import MessageChannel, socket_path_for


@pytest.fixture
def channel(tmp_path):
    ch = MessageChannel(socket_path_for(tmp_path))
    yield ch
    ch.close()


def _client(ch: MessageChannel) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(ch.path))
    return s


def _receive_all(ch: MessageChannel, n: int) -> list[str]:
    got: list[str] = []
    for _ in range(50):
        got += ch.receive(0.2)
        if len(got) >= n:
            break
    return got


def test_lines_split_across_packets(channel):
    c = _client(channel)
    c.sendall(b"Ready for ev")
    assert channel.receive(0.5) == [] and channel.receive(0.1) == []
    c.sendall(b"ents\n/a,ID:1-2-3-4-5,CPU:1,WALL:1\n\n")
    assert _receive_all(channel, 2) == ["Ready for events", "/a,ID:1-2-3-4-5,CPU:1,WALL:1"]
    assert channel.send("No more events")
    assert c.recv(100) == b"No more events\n"
    c.close()


def test_hang_up_is_noticed_and_a_new_payload_may_connect(channel):
    c = _client(channel)
    c.sendall(b"Ready for events\npartial")
    assert _receive_all(channel, 1) == ["Ready for events"]
    c.close()
    for _ in range(20):
        channel.receive(0.1)
        if channel.closed_by_peer:
            break
    assert channel.closed_by_peer and not channel.connected
    assert not channel.send("x")
    c2 = _client(channel)
    c2.sendall(b"Ready for events\n")
    assert _receive_all(channel, 1) == ["Ready for events"]
    c2.close()


def test_long_work_directory_gets_a_short_socket(tmp_path):
    deep = tmp_path / ("d" * 90) / ("e" * 40)
    deep.mkdir(parents=True)
    path = socket_path_for(deep)
    assert len(str(path)) <= 100
    ch = MessageChannel(path)
    ch.close()
    assert not path.parent.exists()


def test_overlong_message_drops_the_connection(channel):
    from pilot.eventservice.channel import MAX_LINE

    c = _client(channel)
    c.setblocking(False)
    data = b"Ready for events\n" + b"x" * (MAX_LINE + 10)
    sent = 0
    got: list[str] = []
    for _ in range(2000):
        try:
            sent += c.send(data[sent:])
        except BlockingIOError:
            pass
        got += channel.receive(0.05)
        if channel.closed_by_peer:
            break
    assert got == ["Ready for events"] and channel.closed_by_peer and not channel.connected
    c.close()
