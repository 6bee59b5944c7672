"""The pilot's end of yampl's ``LOCAL`` transport, which AthenaMP speaks.

AthenaMP (and AthenaMT in MTES mode) reach the pilot through the yampl
library. Its ``LOCAL`` context is a ZeroMQ DEALER that connects to
``ipc:///tmp/zmq_<channel>``; the server side, ours, is a ROUTER bound there
with ``ROUTER_MANDATORY`` so that a reply to a peer that has gone raises
instead of vanishing. Each yampl message is exactly one ZeroMQ frame with no
header of yampl's own, so a ROUTER receives ``[identity, payload]`` and
answers the same way (docs/DESIGN.md, "Event-service transport").

Byte rules, from yampl's and AthenaMP's sources:

* replies are the exact bytes: no trailing NUL, no newline (AthenaMT compares
  ``No more events`` exactly; AthenaMP's range parser keeps a trailing NUL in
  the last value);
* what arrives may end in one NUL (yampl's own Python binding appends it): it
  is dropped before the text is read;
* a ZeroMQ peer that dies sends no end-of-file: whoever owns the channel must
  watch the payload's process, which is why :meth:`RangeChannel.receive` also
  wakes on extra file descriptors (a pidfd).

The socket path lives under ``/tmp`` whatever the work directory is: yampl
fixes it there. A stale file from an earlier run is removed before binding
and the file is removed again on close. Channel names are unique per payload
process (:func:`unique_channel_name`), so two payloads on one node (two
droids, two pilots) never share one.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import zmq

from pilot.errors import ErrorCode, PilotError

log = logging.getLogger(__name__)

SOCKET_DIR = "/tmp"
SOCKET_PREFIX = "zmq_"
DEFAULT_CHANNEL = "EventService_EventRanges"
# A message longer than this is refused as bad (the longest real one, a done
# report with a few output paths, is well under a kilobyte).
MAX_MESSAGE = 1 << 20
# libzmq disconnects a peer that sends a larger frame: that protects memory
# from garbage, while anything up to it is read and refused with a reason.
_MAX_FRAME = 16 << 20
# Messages taken from the socket in one receive() before the caller gets a turn.
_MAX_BATCH = 1000
# How long close() lets a last reply (``No more events``) drain to the peer.
_LINGER_MS = 1000
# sun_path holds 108 bytes with its NUL.
_MAX_PATH = 107
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def unique_channel_name(prefix: str = DEFAULT_CHANNEL) -> str:
    """``EventService_EventRanges_<pid>_<random>``: unique per payload process."""
    return f"{prefix}_{os.getpid()}_{secrets.token_hex(4)}"


def socket_path(name: str) -> Path:
    return Path(SOCKET_DIR) / f"{SOCKET_PREFIX}{name}"


def check_channel_name(name: str) -> str:
    """A channel name that is safe in a path and in a payload's command line."""
    if not _NAME.match(name or ""):
        raise PilotError(ErrorCode.MESSAGEHANDLINGFAILURE, f"bad channel name {name!r}")
    if len(os.fsencode(str(socket_path(name)))) > _MAX_PATH:
        raise PilotError(ErrorCode.MESSAGEHANDLINGFAILURE, f"channel name too long: {name!r}")
    return name


@dataclass(frozen=True)
class Incoming:
    """One message from a peer: its text, or why it could not be read (``text`` is None)."""

    peer: bytes
    text: str | None
    error: str = ""
    size: int = 0


def decode_frames(frames: Sequence[bytes]) -> Incoming:
    """What a ROUTER received, as yampl means it: one frame after the peer's identity."""
    peer = bytes(frames[0]) if frames else b""
    if len(frames) != 2:
        return Incoming(peer, None, f"expected one frame, got {len(frames) - 1}")
    data = bytes(frames[1])
    if data.endswith(b"\0"):
        data = data[:-1]
    if len(data) > MAX_MESSAGE:
        return Incoming(
            peer, None, f"message of {len(data)} bytes (limit {MAX_MESSAGE})", len(data)
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Incoming(peer, None, f"message is not UTF-8 ({exc.reason})", len(data))
    if not text:
        return Incoming(peer, None, "empty message")
    return Incoming(peer, text, size=len(data))


class RangeChannel:
    """A bound ROUTER at ``ipc:///tmp/zmq_<name>``; any number of DEALER peers.

    The channel owns its ZeroMQ context (one I/O thread): nothing is shared
    between channels, and closing one ends its thread.
    """

    def __init__(self, name: str) -> None:
        self.name = check_channel_name(name)
        self.path = socket_path(name)
        self.endpoint = f"ipc://{self.path}"
        self._remove_file()
        self._context = zmq.Context(io_threads=1)
        self._socket = self._context.socket(zmq.ROUTER)
        try:
            self._socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
            self._socket.setsockopt(zmq.MAXMSGSIZE, _MAX_FRAME)
            self._socket.setsockopt(zmq.LINGER, _LINGER_MS)
            self._socket.bind(self.endpoint)
        except zmq.ZMQError as exc:
            self._socket.close(0)
            self._context.term()
            raise PilotError(
                ErrorCode.MESSAGEHANDLINGFAILURE, f"cannot bind {self.endpoint}: {exc}"
            ) from None
        self._poller = zmq.Poller()
        self._poller.register(self._socket, zmq.POLLIN)
        self.closed = False

    def _remove_file(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise PilotError(
                ErrorCode.MESSAGEHANDLINGFAILURE, f"cannot remove stale {self.path}: {exc}"
            ) from None

    def receive(self, timeout: float, also: Sequence[int] = ()) -> list[Incoming]:
        """Messages that arrived within ``timeout`` seconds (returns at the first batch).

        ``also``: file descriptors that end the wait when readable (the
        payload's pidfd: its death wakes the caller at once).
        """
        for fd in also:
            self._poller.register(fd, zmq.POLLIN)
        try:  # pyzmq retries a poll interrupted by a signal itself
            events = dict(self._poller.poll(max(0, int(timeout * 1000))))
        finally:
            for fd in also:
                self._poller.unregister(fd)
        if self._socket not in events:
            return []
        out: list[Incoming] = []
        for _ in range(_MAX_BATCH):
            try:
                frames = self._socket.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                break
            out.append(decode_frames(frames))
        return out

    def send(self, peer: bytes, text: str) -> bool:
        """Send ``text`` to ``peer``, exactly its bytes; False if the peer is gone or full."""
        try:
            self._socket.send_multipart([peer, text.encode("utf-8")], zmq.NOBLOCK)
        except zmq.Again:
            log.warning("payload does not read its channel: message not sent")
            return False
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                log.warning("payload peer %s has gone: message not sent", peer.hex())
                return False
            raise PilotError(
                ErrorCode.MESSAGEHANDLINGFAILURE, f"cannot send on {self.endpoint}: {exc}"
            ) from None
        return True

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._socket.close(_LINGER_MS)
        self._context.term()
        try:
            self._remove_file()
        except PilotError as exc:
            log.warning("%s", exc)

    def __enter__(self) -> RangeChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
