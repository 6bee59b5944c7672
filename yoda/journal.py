"""Append-only journal of the ledger, and its replay for ``pilot hpc --resume``.

Every state change is written here (and flushed to the OS) *before* it is
applied, so a SIGKILL of rank 0 loses at most the change being decided, never
one that a droid or the upstream was already told about. fsync runs in
batches (every ``sync_every`` records or ``sync_interval`` seconds, and on
:meth:`Journal.sync`), since one fsync per range would cap the rate at the
disk's latency; the flush alone survives a process kill, the fsync a node crash.

One JSON object per line; a truncated last line (killed mid-write) is
ignored on replay. Records (``op``):

``epoch``  ``{"n"}``                       a new incarnation of Yoda
``job``    ``{"job": <PanDA job dict>}``   job index = order of appearance
``add``    ``{"j", "f": {fref: [lfn, guid, scope, pfn]}, "r": [[file, proc, att, start, last, fref], ...]}``
``lease``  ``{"d", "t", "r": [row, ...]}``  leased to droid ``d`` until ``t``
``rel``    ``{"c", "r": [row, ...]}``       back to READY (``c``: an attempt is charged)
``done``   ``{"d", "res": [[row, RangeResult dict], ...]}``
``sent``   ``{"r": [row, ...]}``            the upstream acknowledged these results
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hpc.transport import result_to_wire
from pilot.errors import ErrorCode, PilotError
from pilot.eventservice.model import RangeResult, RangeStatus
from yoda.ledger import Ledger, State

STATUS_STATE = {
    RangeStatus.FINISHED: State.FINISHED,
    RangeStatus.FAILED: State.FAILED,
    RangeStatus.FATAL: State.FATAL,
}


class Journal:
    """The writer. ``path`` is created; an existing journal is appended to."""

    def __init__(
        self, path: str | Path, *, sync_every: int = 256, sync_interval: float = 1.0
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._fh = open(self.path, "ab")
        except OSError as exc:
            raise PilotError(
                ErrorCode.FILEHANDLINGFAILURE, f"cannot open journal {self.path}: {exc}"
            ) from None
        self.sync_every = sync_every
        self.sync_interval = sync_interval
        self._unsynced = 0
        self._last_sync = time.monotonic()
        self.records = 0

    def append(self, rec: dict[str, Any]) -> None:
        line = json.dumps(rec, separators=(",", ":")).encode() + b"\n"
        try:
            self._fh.write(line)
            self._fh.flush()
        except OSError as exc:
            raise PilotError(
                ErrorCode.NOLOCALSPACE if exc.errno == 28 else ErrorCode.FILEHANDLINGFAILURE,
                f"cannot write journal {self.path}: {exc}",
            ) from None
        self.records += 1
        self._unsynced += 1
        if (
            self._unsynced >= self.sync_every
            or time.monotonic() - self._last_sync >= self.sync_interval
        ):
            self.sync()

    def sync(self) -> None:
        if self._unsynced:
            os.fsync(self._fh.fileno())
            self._unsynced = 0
        self._last_sync = time.monotonic()

    def close(self) -> None:
        if not self._fh.closed:
            self.sync()
            self._fh.close()


@dataclass
class Replayed:
    """What a journal rebuilds: the ledger, the jobs, and results not yet acknowledged upstream."""

    ledger: Ledger
    jobs: list[dict[str, Any]] = field(default_factory=list)
    unsent: dict[int, Any] = field(default_factory=dict)  # RangeResult once replayed
    epoch: int = 0
    records: int = 0
    torn: bool = False


class Book:
    """The ledger behind its journal: every transition is journaled, then applied.

    This is the only way the scheduler and master change the ledger, so the
    write-ahead rule cannot be forgotten at one call site.
    """

    def __init__(self, ledger: Ledger, journal: Journal | None) -> None:
        self.ledger = ledger
        self.journal = journal
        self.jobs: list[dict[str, Any]] = []
        self.unsent: dict[int, RangeResult] = {}

    def _log(self, rec: dict[str, Any]) -> None:
        if self.journal is not None:
            self.journal.append(rec)

    def add_job(self, job: dict[str, Any]) -> int:
        panda_id = int(job["PandaID"])
        known = self.ledger.job_of(panda_id)
        if known is not None and known < len(self.jobs):
            return known
        self._log({"op": "job", "job": job})
        self.jobs.append(job)
        return self.ledger.add_job(panda_id, int(job.get("taskID") or job.get("jediTaskID") or 0))

    def add_ranges(self, job: int, ranges: list[Any]) -> np.ndarray:
        """Add validated :class:`EventRange` objects of job ``job``."""
        new_files: dict[int, list[str]] = {}
        rec_rows = []
        for r in ranges:
            fref, fresh = self.ledger.intern_file(r.lfn, r.guid, r.scope, r.pfn)
            if fresh:
                new_files[fref] = [r.lfn, r.guid, r.scope, r.pfn]
            _, _, file_id, proc, attempt = (int(p) for p in r.event_range_id.split("-"))
            rec_rows.append([file_id, proc, attempt, r.start_event, r.last_event, fref])
        if not rec_rows:
            return np.zeros(0, dtype=np.int64)
        self._log({"op": "add", "j": job, "f": new_files, "r": rec_rows})
        return _apply_add(self.ledger, job, rec_rows)

    def lease(self, rows: list[int], droid: int, deadline: float) -> None:
        if rows:
            self._log({"op": "lease", "d": droid, "t": round(deadline, 3), "r": rows})
            self.ledger.lease(rows, droid, deadline)

    def release(self, rows: list[int], charge: bool) -> None:
        if rows:
            self._log({"op": "rel", "c": int(charge), "r": rows})
            self.ledger.release(rows, charge)

    def done(self, droid: int, results: list[tuple[int, RangeResult]]) -> None:
        if not results:
            return
        if self.journal is not None:
            self._log(
                {"op": "done", "d": droid, "res": [[row, result_to_wire(r)] for row, r in results]}
            )
        by_state: dict[State, list[int]] = {}
        for row, r in results:
            by_state.setdefault(STATUS_STATE[r.status], []).append(row)
            self.unsent[row] = r
        for state, rows in by_state.items():
            self.ledger.finish(rows, state)

    def sent(self, rows: list[int]) -> None:
        if rows:
            self._log({"op": "sent", "r": rows})
            for row in rows:
                self.unsent.pop(row, None)

    def epoch(self, n: int) -> None:
        self._log({"op": "epoch", "n": n})
        if self.journal is not None:
            self.journal.sync()


def _apply_add(ledger: Ledger, job: int, rec_rows: list[list[int]]) -> np.ndarray:
    a = np.asarray(rec_rows, dtype=np.int64).reshape(-1, 6)
    return ledger.add_columns(job, a[:, 0], a[:, 1], a[:, 2], a[:, 3], a[:, 4], a[:, 5])


def replay(path: str | Path, *, capacity: int = 1024) -> Replayed:
    """Rebuild the ledger from a journal. A torn last line is dropped; a torn middle is an error."""
    path = Path(path)
    ledger = Ledger(capacity=capacity)
    out = Replayed(ledger)
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        raise PilotError(ErrorCode.NOSUCHFILE, f"journal {path} does not exist") from None
    with fh:
        lines = fh.read().split(b"\n")
    last = len(lines) - 1
    for i, line in enumerate(lines):
        if not line:
            continue
        try:
            rec = json.loads(line)
            _apply(out, rec)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            if i == last:  # killed mid-write: the change was never applied
                out.torn = True
                break
            raise PilotError(
                ErrorCode.FILEHANDLINGFAILURE, f"journal {path} line {i + 1} is corrupt: {exc}"
            ) from None
        out.records += 1
    out.unsent = {row: RangeResult.from_dict(d) for row, d in out.unsent.items()}
    return out


def _apply(out: Replayed, rec: dict[str, Any]) -> None:
    ledger = out.ledger
    op = rec["op"]
    if op == "add":
        for fref, f in rec["f"].items():
            got, _ = ledger.intern_file(*f)
            if got != int(fref):
                raise ValueError(f"file table out of step: {fref} != {got}")
        _apply_add(ledger, int(rec["j"]), rec["r"])
    elif op == "lease":
        ledger.lease(rec["r"], int(rec["d"]), float(rec["t"]))
    elif op == "rel":
        ledger.release(rec["r"], bool(rec["c"]))
    elif op == "done":
        by_state: dict[State, list[int]] = {}
        for row, d in rec["res"]:
            by_state.setdefault(STATUS_STATE[RangeStatus(d["status"])], []).append(row)
            out.unsent[row] = d  # made a RangeResult at the end, if still unsent
        for state, rows in by_state.items():
            ledger.finish(rows, state)
    elif op == "sent":
        for row in rec["r"]:
            out.unsent.pop(row, None)
    elif op == "job":
        job = rec["job"]
        out.jobs.append(job)
        ledger.add_job(int(job["PandaID"]), int(job.get("taskID") or job.get("jediTaskID") or 0))
    elif op == "epoch":
        out.epoch = int(rec["n"])
    else:
        raise ValueError(f"unknown op {op!r}")


def resume_book(path: str | Path, *, sync_every: int = 256) -> tuple[Book, int]:
    """Replay ``path``, then keep journaling to it. Leases of the dead incarnation go back
    to READY without charging an attempt (the droids were killed with Yoda). Returns the
    book and the new epoch."""
    rep = replay(path)
    if rep.torn:
        # cut the torn tail so that new records start on a fresh line
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[: data.rfind(b"\n") + 1])
    book = Book(rep.ledger, Journal(path, sync_every=sync_every))
    book.jobs = rep.jobs
    book.unsent = rep.unsent
    epoch = rep.epoch + 1
    book.epoch(epoch)
    leased = [int(r) for r in rep.ledger.leased()]
    book.release(leased, charge=False)
    return book, epoch
