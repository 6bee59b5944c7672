"""Durable queue of server calls that could not be delivered.

An update the server did not take (down, unreachable, 5xx) is written to the
spool directory as one JSON file (temporary file + rename: a reader never
sees half of one) and sent later, in order: at the next start of the pilot,
before the next final update, or by ``pilot status --flush``.

Exactly once: a pilot may die after the server recorded an update and before
the file was deleted, so the same update can arrive twice. The server makes
that harmless: PanDA ignores a second final update of a job attempt that is
already final, and the embedded dispatcher records it only as a duplicate
(it deduplicates final states on ``(jobId, attemptNr)``). No extra field is
added, since a real PanDA server is strict about updateJob's parameters.

Entries keep the legacy method and field names (``updateJob``, ``jobId``,
``state`` ...) whatever API carried the first try: the client maps them to
``/api/v1`` when it sends them, so a spool written against an old server is
delivered to a current one, and the other way round.

An update the server understood and refused (unknown job, bad field) cannot
succeed by being sent again: it moves to ``rejected/`` for an operator, it
is never silently dropped.

The spool sends through any :class:`SpoolClient` and never imports the PanDA
client, which imports it (docs/DESIGN.md, "What each package may import");
``pilot status --flush`` (:mod:`pilot.server.submit`) builds the client and
calls :func:`flush_spool`.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pilot.errors import ErrorCode, PilotError
from pilot.fileio import atomic_write_json

log = logging.getLogger(__name__)


class SpoolClient(Protocol):
    def post(self, method: str, data: dict[str, Any]) -> Any: ...


@dataclass(frozen=True)
class SpoolEntry:
    id: str
    method: str
    fields: dict[str, Any]
    created: float
    path: Path


class Spool:
    """Undelivered calls, one file each, in ``directory`` (created when needed)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    @property
    def rejected_dir(self) -> Path:
        return self.directory / "rejected"

    def put(self, method: str, fields: dict[str, Any], *, rejected: bool = False) -> str:
        """Write one call durably; returns its id (which also orders the spool)."""
        entry_id = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
        record = {"id": entry_id, "method": method, "fields": fields, "created": time.time()}
        target = (self.rejected_dir if rejected else self.directory) / f"{entry_id}.json"
        try:
            atomic_write_json(target, record)
        except OSError as exc:
            raise PilotError(
                ErrorCode.FILEHANDLINGFAILURE, f"cannot spool {method} to {target}: {exc}"
            ) from None
        log.info("spooled %s as %s", method, target)
        return entry_id

    def _entries(self, directory: Path) -> list[SpoolEntry]:
        try:
            names = sorted(p for p in directory.glob("*.json") if not p.name.startswith("."))
        except OSError:
            return []
        out = []
        for path in names:
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
                entry = SpoolEntry(
                    str(record["id"]),
                    str(record["method"]),
                    dict(record["fields"]),
                    float(record.get("created", 0.0)),
                    path,
                )
            except FileNotFoundError:
                continue  # delivered by a concurrent flush
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.error("unreadable spool file %s (%s): moved aside", path, exc)
                self._move_aside(path)
                continue
            out.append(entry)
        return out

    def pending(self) -> list[SpoolEntry]:
        """Calls still to be sent, oldest first."""
        return self._entries(self.directory)

    def rejected(self) -> list[SpoolEntry]:
        """Calls the server refused, kept for an operator."""
        return self._entries(self.rejected_dir)

    def _move_aside(self, path: Path) -> None:
        self.rejected_dir.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(path, self.rejected_dir / path.name)
        except FileNotFoundError:
            pass

    @contextmanager
    def _locked(self) -> Iterator[bool]:
        """One flusher at a time across processes; False when another one is at it."""
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def flush(self, client: SpoolClient) -> tuple[int, int]:
        """Send pending calls in order; returns (sent, left).

        Stops at the first call that fails for a reason that may pass
        (transport, 5xx, authentication) so the order is kept; a call the
        server refused for good moves to ``rejected/`` and the flush goes on.
        """
        if not self.directory.is_dir():
            return 0, 0
        with self._locked() as mine:
            entries = self.pending()
            if not mine:
                return 0, len(entries)
            sent = 0
            for i, entry in enumerate(entries):
                try:
                    reply = client.post(entry.method, entry.fields)
                except PilotError as exc:
                    log.warning("spool flush stopped at %s: %s", entry.id, exc.detail)
                    return sent, len(entries) - i
                if reply.ok:
                    entry.path.unlink(missing_ok=True)
                    sent += 1
                elif reply.permanent_failure:
                    log.error(
                        "server refused spooled %s %s: %s", entry.method, entry.id, reply.error
                    )
                    self._move_aside(entry.path)
                else:
                    log.warning("spool flush stopped at %s: %s", entry.id, reply.error)
                    return sent, len(entries) - i
            return sent, 0


def flush_spool(directory: str | Path, client: SpoolClient) -> int:
    """Flush and print a one-line summary; 0 when nothing is left, 1 otherwise."""
    spool = Spool(directory)
    sent, left = spool.flush(client)
    refused = len(spool.rejected())
    print(f"spool {directory}: sent {sent}, left {left}, refused (kept) {refused}")
    return 0 if left == 0 else 1
