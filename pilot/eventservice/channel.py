"""The pilot's end of the message channel to an event-service payload.

A Unix stream socket: local, needs no port, and a crashed payload shows up as
end-of-file at once, so the pilot learns of it without polling the process.
Framing is one UTF-8 text line per message, ending in ``\\n``: AthenaMP's
messages never contain a newline, and a payload in any language (or
``socat``) can speak it. A line longer than :data:`MAX_LINE` is a protocol
error. The payload finds the socket in the ``PILOT_ES_CHANNEL`` environment
variable (toysim also takes ``--channel``).

Everything waits in ``select`` with a timeout; nothing spins. One payload is
connected at a time: a new connection (a restarted payload) replaces the old.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import tempfile
from pathlib import Path
from typing import Any

from pilot.errors import ErrorCode, PilotError

log = logging.getLogger(__name__)

CHANNEL_VARIABLE = "PILOT_ES_CHANNEL"
MAX_LINE = 1 << 20
# sun_path holds 108 bytes on Linux; deep work directories do not fit.
_MAX_SOCKET_PATH = 100


def socket_path_for(workdir: Path, name: str = "es.sock") -> Path:
    """A socket path in ``workdir``, or in a private temp directory if that path is too long."""
    path = Path(workdir).resolve() / name
    if len(os.fsencode(str(path))) <= _MAX_SOCKET_PATH:
        return path
    return Path(tempfile.mkdtemp(prefix="pilot-es-")) / name


class MessageChannel:
    """Listening socket plus at most one connected payload."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._own_dir = self.path.parent.name.startswith("pilot-es-")
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._listener.bind(str(self.path))
            self._listener.listen(4)
        except OSError as exc:
            self._listener.close()
            raise PilotError(
                ErrorCode.MESSAGEHANDLINGFAILURE, f"cannot listen on {self.path}: {exc}"
            ) from None
        self._listener.setblocking(False)
        self._conn: socket.socket | None = None
        self._buffer = b""
        self.closed_by_peer = False

    @property
    def connected(self) -> bool:
        return self._conn is not None

    def fileno(self) -> int:
        return self._listener.fileno()

    def _accept(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        if self._conn is not None:
            log.info("payload reconnected: dropping the previous connection")
            self._drop()
        conn.setblocking(False)
        self._conn = conn
        self._buffer = b""
        self.closed_by_peer = False

    def _drop(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except OSError:
                pass
        self._conn = None
        self._buffer = b""

    def receive(self, timeout: float, also: tuple[int, ...] = ()) -> list[str]:
        """Messages that arrived within ``timeout`` seconds (returns at the first batch).

        ``also``: more file descriptors that end the wait when readable (the
        payload's pidfd, so its death wakes the pilot at once). A peer that
        hangs up leaves ``closed_by_peer`` set; a partial last line it left
        behind is dropped with a warning.
        """
        waitables: list[Any] = [self._listener, *also]
        if self._conn is not None:
            waitables.append(self._conn)
        try:
            ready, _, _ = select.select(waitables, [], [], max(0.0, timeout))
        except InterruptedError:
            return []
        messages: list[str] = []
        if self._listener in ready:
            self._accept()
        if self._conn is not None and self._conn in ready:
            try:
                chunk = self._conn.recv(65536)
            except (BlockingIOError, InterruptedError):
                chunk = None
            except OSError as exc:
                log.warning("payload channel error: %s", exc)
                chunk = b""
            if chunk == b"":
                if self._buffer.strip():
                    log.warning(
                        "payload hung up in the middle of a message: %r", self._buffer[:200]
                    )
                self._drop()
                self.closed_by_peer = True
            elif chunk:
                self._buffer += chunk
                messages = self._split()
        return messages

    def _split(self) -> list[str]:
        *lines, rest = self._buffer.split(b"\n")
        self._buffer = rest
        if len(rest) > MAX_LINE:
            log.warning("payload message longer than %d bytes: dropping the connection", MAX_LINE)
            self._drop()
            self.closed_by_peer = True
        out = []
        for raw in lines:
            text = raw.decode("utf-8", "replace").strip()
            if text:
                out.append(text)
        return out

    def send(self, message: str, timeout: float = 10.0) -> bool:
        """Send one line; False when no payload is connected or it went away."""
        if self._conn is None:
            return False
        data = message.encode("utf-8") + b"\n"
        view = memoryview(data)
        while view:
            try:
                n = self._conn.send(view)
            except (BlockingIOError, InterruptedError):
                _, writable, _ = select.select([], [self._conn], [], timeout)
                if not writable:
                    log.warning("payload does not read its channel: message not sent")
                    return False
                continue
            except OSError as exc:
                log.warning("cannot send to the payload: %s", exc)
                self._drop()
                self.closed_by_peer = True
                return False
            view = view[n:]
        return True

    def close(self) -> None:
        self._drop()
        try:
            self._listener.close()
        except OSError:
            pass
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        if self._own_dir:
            try:
                self.path.parent.rmdir()
            except OSError:
                pass
