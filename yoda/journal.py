"""Append-only journal of the ledger, and its replay for ``pilot hpc --resume``.

Every state change is written here (and handed to the OS) *before* it is
applied, so a SIGKILL of rank 0 loses at most the change being decided, never
one that a droid or the upstream was already told about. fsync runs in
batches (every ``sync_every`` records or ``sync_interval`` seconds, and on
:meth:`Journal.sync`), since one fsync per range would cap the rate at the
disk's latency; the write alone survives a process kill, the fsync a node crash.

The format is binary because it is on rank 0's per-range path: a record is a
batch of rows as a numpy array plus a little JSON, not a line of JSON per
range. The file starts with :data:`MAGIC`; then records of

    op (u8) | meta length (u32) | data length (u32) | CRC-32 (u32) | meta | data

little-endian, where meta is a JSON object (or empty) and data the raw bytes
of a structured array whose dtype the op fixes. The CRC covers the op, the
lengths, meta and data. A record cut short at the end of the file (killed
mid-write) is ignored on replay; a bad record anywhere else is an error.

======  ===========================================  ========================
op      meta                                         data
======  ===========================================  ========================
EPOCH   ``{"n"}``: a new incarnation of Yoda
JOB     ``{"job": <PanDA job dict>}``                job index = order
ADD     ``{"j", "f": {fref: [lfn, guid, scope, pfn]}}``  :data:`ADD_DTYPE`
LEASE   ``{"d", "t"}``: to droid ``d`` until ``t``     rows (i8)
RELEASE ``{"c"}``: ``c`` = an attempt is charged       rows (i8)
DONE    ``{"d", "p", "a", "e"}``: paths, adler32s,     ``hpc.wire.RESULT_DTYPE``
        diagnostics of the results
SENT    the upstream acknowledged these results      rows (i8)
======  ===========================================  ========================
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import time
import zlib
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any

import numpy as np

from hpc.wire import RESULT_DTYPE, ResultBatch
from pilot.errors import ErrorCode, PilotError
from pilot.eventservice.model import RangeResult
from pilot.job import EventRange
from yoda.ledger import ADD_DTYPE, Ledger, State, columns_of

MAGIC = b"YODAJ\x00\x01\n"  # format version 1
_HEAD = struct.Struct("<BIII")  # op, meta length, data length, CRC
_CHECKED = struct.Struct("<BII")  # the part of the head the CRC covers
_JSON = json.JSONEncoder(separators=(",", ":"))  # one encoder: json.dumps makes one per call
ROWS_DTYPE = np.dtype("<i8")


class Op(IntEnum):
    EPOCH = 1
    JOB = 2
    ADD = 3
    LEASE = 4
    RELEASE = 5
    DONE = 6
    SENT = 7


_JSON_IN = json.JSONDecoder()
_OPS = {int(o): o for o in Op}

DATA_DTYPE = {
    Op.ADD: ADD_DTYPE,
    Op.LEASE: ROWS_DTYPE,
    Op.RELEASE: ROWS_DTYPE,
    Op.DONE: RESULT_DTYPE,
    Op.SENT: ROWS_DTYPE,
}


def _crc(head: bytes, meta: bytes, data: bytes) -> int:
    return zlib.crc32(data, zlib.crc32(meta, zlib.crc32(head)))


class Journal:
    """The writer. ``path`` is created; an existing journal is appended to."""

    def __init__(
        self,
        path: str | Path,
        *,
        sync_every: int = 256,
        sync_interval: float = 1.0,
        group: bool = False,
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # unbuffered: each record is one write(2), in the OS once it returns
            self._fh = open(self.path, "ab", buffering=0)
            if self._fh.tell() == 0:
                self._fh.write(MAGIC)
        except OSError as exc:
            raise PilotError(
                ErrorCode.FILEHANDLINGFAILURE, f"cannot open journal {self.path}: {exc}"
            ) from None
        self.sync_every = sync_every
        self.sync_interval = sync_interval
        # group commit: records wait in memory until flush(), which the owner calls
        # before anyone is told of them; one write(2) then carries them all
        self.group = group
        self._held: list[bytes] = []
        self._held_bytes = 0
        self._unsynced = 0
        self._last_sync = time.monotonic()
        self.records = 0

    def append(self, op: Op, meta: dict[str, Any] | None = None, data: Any = None) -> None:
        m = _JSON.encode(meta).encode() if meta is not None else b""
        d = data.tobytes() if data is not None else b""
        head = _CHECKED.pack(op, len(m), len(d))
        record = _HEAD.pack(op, len(m), len(d), _crc(head, m, d)) + m + d
        self.records += 1
        self._unsynced += 1
        if self.group:
            self._held.append(record)
            self._held_bytes += len(record)
            if self._held_bytes < 1 << 22:
                return
            record = self._take_held()
        self._write(record)
        if (
            self._unsynced >= self.sync_every
            or time.monotonic() - self._last_sync >= self.sync_interval
        ):
            self.sync()

    def _take_held(self) -> bytes:
        data = b"".join(self._held)
        self._held.clear()
        self._held_bytes = 0
        return data

    def _write(self, data: bytes) -> None:
        try:
            written = self._fh.write(data)
            while written < len(data):  # a raw write may be short
                written += self._fh.write(data[written:])
        except OSError as exc:
            raise PilotError(
                ErrorCode.NOLOCALSPACE if exc.errno == 28 else ErrorCode.FILEHANDLINGFAILURE,
                f"cannot write journal {self.path}: {exc}",
            ) from None

    def flush(self) -> None:
        """Hand held records to the OS (group commit); a no-op otherwise."""
        if self._held:
            self._write(self._take_held())

    def sync(self) -> None:
        self.flush()
        if self._unsynced:
            os.fsync(self._fh.fileno())
            self._unsynced = 0
        self._last_sync = time.monotonic()

    def close(self) -> None:
        if not self._fh.closed:
            self.sync()
            self._fh.close()


@dataclass
class Record:
    op: Op
    meta: Any
    data: np.ndarray | None
    end: int  # file offset just past the record


def read_records(blob: bytes, name: str = "journal") -> Iterator[Record]:
    """Records of a journal's bytes. A torn last record ends the iteration quietly
    (check ``Record.end`` against ``len(blob)``); damage elsewhere raises PilotError."""
    if len(blob) < len(MAGIC) and MAGIC.startswith(blob):
        return  # killed before the header was out: an empty journal
    if not blob.startswith(MAGIC):
        raise PilotError(ErrorCode.FILEHANDLINGFAILURE, f"{name} is not a Yoda journal")
    pos, size = len(MAGIC), len(blob)
    view = memoryview(blob)  # slices of it copy nothing
    while pos < size:
        if pos + _HEAD.size > size:
            return  # torn header
        op, ml, dl, crc = _HEAD.unpack_from(blob, pos)
        start = pos + _HEAD.size
        end = start + ml + dl
        if end > size:
            return  # torn body
        meta_b, data_b = view[start : start + ml], view[start + ml : end]
        bad = _crc(_CHECKED.pack(op, ml, dl), meta_b, data_b) != crc
        try:
            if bad:
                raise ValueError("checksum mismatch")
            kind = _OPS.get(op)
            if kind is None:
                raise ValueError(f"{op} is not a record kind")
            meta = _JSON_IN.decode(str(meta_b, "utf-8")) if ml else None
            dtype = DATA_DTYPE.get(kind)
            if dtype is None:
                data = None
            elif dl % dtype.itemsize:
                raise ValueError(f"{dl} bytes is not a whole number of rows")
            else:
                data = np.frombuffer(data_b, dtype=dtype).copy()
        except ValueError as exc:  # UnicodeDecodeError included
            if end == size:  # the last write, damaged by the crash
                return
            raise PilotError(
                ErrorCode.FILEHANDLINGFAILURE, f"{name} is corrupt at byte {pos}: {exc}"
            ) from None
        yield Record(kind, meta, data, end)
        pos = end


class Unsent:
    """Results journaled but not yet accepted upstream, as column batches in arrival order."""

    def __init__(self) -> None:
        self._batches: deque[ResultBatch] = deque()
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def __bool__(self) -> bool:
        return self._n > 0

    def add(self, batch: ResultBatch) -> None:
        if len(batch):
            self._batches.append(batch)
            self._n += len(batch)

    def put_back(self, batch: ResultBatch) -> None:
        """Return a batch taken by :meth:`take` that could not be sent (it goes first again)."""
        if len(batch):
            self._batches.appendleft(batch)
            self._n += len(batch)

    def take(self, n: int) -> ResultBatch:
        """Remove and return up to ``n`` results from the front."""
        parts, got = [], 0
        while self._batches and got < n:
            b = self._batches.popleft()
            if got + len(b) > n:
                cut = n - got
                self._batches.appendleft(b.select(slice(cut, None)))
                b = b.select(slice(cut))
            parts.append(b)
            got += len(b)
        self._n -= got
        return ResultBatch.concat(parts)

    def peek(self) -> ResultBatch:
        """All of them, left in place."""
        return ResultBatch.concat(list(self._batches))

    def rows(self) -> np.ndarray:
        if not self._batches:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([b.rows for b in self._batches])


@dataclass
class Replayed:
    """What a journal rebuilds: the ledger, the jobs, and results not yet acknowledged upstream."""

    ledger: Ledger
    jobs: list[dict[str, Any]] = field(default_factory=list)
    unsent: Unsent = field(default_factory=Unsent)
    epoch: int = 0
    records: int = 0
    torn: bool = False
    end: int = 0  # bytes of whole records; a torn tail lies beyond
    done: list[tuple[int, ResultBatch]] | None = None  # (droid, batch), if asked for


class Book:
    """The ledger behind its journal: every transition is journaled, then applied.

    This is the only way the scheduler and master change the ledger, so the
    write-ahead rule cannot be forgotten at one call site.
    """

    def __init__(self, ledger: Ledger, journal: Journal | None) -> None:
        self.ledger = ledger
        self.journal = journal
        self.jobs: list[dict[str, Any]] = []
        self.unsent = Unsent()

    def _log(self, op: Op, meta: dict[str, Any] | None = None, data: Any = None) -> None:
        if self.journal is not None:
            self.journal.append(op, meta, data)

    def add_job(self, job: dict[str, Any]) -> int:
        panda_id = int(job["PandaID"])
        known = self.ledger.job_of(panda_id)
        if known is not None and known < len(self.jobs):
            return known
        self._log(Op.JOB, {"job": job})
        self.jobs.append(job)
        return self.ledger.add_job(panda_id, _task_id(job))

    def add_columns(
        self, job: int, cols: np.ndarray, files: Sequence[tuple[str, ...]]
    ) -> np.ndarray:
        """Add ranges of job ``job`` given as :data:`ADD_DTYPE` columns whose ``fref``
        indexes ``files`` (validated upstream ranges); returns their new rows."""
        if not len(cols):
            return np.zeros(0, dtype=np.int64)
        cols, new_files = self.ledger.intern_files(cols, files)
        self._log(Op.ADD, {"j": job, "f": new_files}, cols)
        return self.ledger.add_block(job, cols)

    def add_ranges(self, job: int, ranges: Sequence[EventRange]) -> np.ndarray:
        """Add validated :class:`EventRange` objects of job ``job``."""
        return self.add_columns(job, *columns_of(ranges))

    def lease(self, rows: np.ndarray, droid: int, deadline: float) -> None:
        if len(rows):
            self._log(Op.LEASE, {"d": droid, "t": round(deadline, 3)}, _rows(rows))
            self.ledger.lease(rows, droid, deadline)

    def release(self, rows: Any, charge: bool) -> None:
        if len(rows):
            self._log(Op.RELEASE, {"c": int(charge)}, _rows(rows))
            self.ledger.release(rows, charge)

    def done(self, droid: int, batch: ResultBatch) -> None:
        if not len(batch):
            return
        path, adler, diag = batch.packed_texts()
        self._log(Op.DONE, {"d": droid, "p": path, "a": adler, "e": diag}, batch.cols)
        _apply_done(self.ledger, batch)
        self.unsent.add(batch)

    def sent(self, rows: Any) -> None:
        if len(rows):
            self._log(Op.SENT, None, _rows(rows))

    def epoch(self, n: int) -> None:
        self._log(Op.EPOCH, {"n": n})
        if self.journal is not None:
            self.journal.sync()


def _task_id(job: dict[str, Any]) -> int:
    """The job's task, under either of PanDA's names for it (0 if it has none)."""
    return int(job.get("taskID") or job.get("jediTaskID") or 0)


def _rows(rows: Any) -> np.ndarray:
    return np.asarray(rows, dtype=ROWS_DTYPE)


def _apply_done(ledger: Ledger, batch: ResultBatch) -> None:
    states = batch.cols["state"]
    if len(states) and (states == states[0]).all():  # all finished, say: no sort
        ledger.finish(batch.rows, State(int(states[0])))
        return
    for state in np.unique(states).tolist():
        ledger.finish(batch.rows[states == state], State(state))


def replay(path: str | Path, *, capacity: int = 1024, keep_done: bool = False) -> Replayed:
    """Rebuild the ledger from a journal. A torn last record is dropped; a torn middle is
    an error. ``keep_done`` also keeps every result with its droid (for reports)."""
    path = Path(path)
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        raise PilotError(ErrorCode.NOSUCHFILE, f"journal {path} does not exist") from None
    except OSError as exc:
        raise PilotError(ErrorCode.FILEHANDLINGFAILURE, f"cannot read {path}: {exc}") from None
    ledger = Ledger(capacity=capacity)
    out = Replayed(ledger, end=len(MAGIC), done=[] if keep_done else None)
    done: list[tuple[np.ndarray, dict[str, Any]]] = []  # DONE records: columns, meta
    sent: list[np.ndarray] = []
    moves = _Transitions()
    for rec in read_records(blob, f"journal {path}"):
        try:
            _apply(out, rec, done, sent, moves)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise PilotError(
                ErrorCode.FILEHANDLINGFAILURE, f"journal {path}: bad {rec.op.name} record: {exc}"
            ) from None
        out.records += 1
        out.end = rec.end
    out.torn = out.end < len(blob)
    try:
        moves.apply(ledger)
    except PilotError as exc:
        raise PilotError(exc.code, f"journal {path}: {exc.diag}") from None
    if done:
        try:
            out.unsent.add(_unsent(done, sent))
        except ValueError as exc:
            raise PilotError(
                ErrorCode.FILEHANDLINGFAILURE, f"journal {path}: bad DONE record: {exc}"
            ) from None
    return out


def _done_batch(data: np.ndarray, meta: dict[str, Any]) -> ResultBatch:
    return ResultBatch.unpacked(data, meta["p"], meta["a"], meta["e"])


def _unsent(done: list[tuple[np.ndarray, dict[str, Any]]], sent: list[np.ndarray]) -> ResultBatch:
    """The results no SENT record names. Only their records' strings are rebuilt: at the
    end of an allocation that is a few records out of a hundred thousand."""
    rows = np.concatenate([data["row"] for data, _ in done])
    gone = np.concatenate(sent) if sent else np.zeros(0, dtype=np.int64)
    waiting = ~np.isin(rows, gone)
    ends = np.cumsum([len(data) for data, _ in done])
    records = np.unique(np.searchsorted(ends, np.flatnonzero(waiting), side="right"))
    kept = []
    for i in records.tolist():
        data, meta = done[i]
        lo = int(ends[i]) - len(data)
        kept.append(_done_batch(data, meta).select(waiting[lo : int(ends[i])]))
    return ResultBatch.concat(kept)


class _Transitions:
    """LEASE, RELEASE and DONE records of a replay, applied at its end in one pass.

    Applied one by one they cost ~20 us per record, most of a replay. A row's
    state, holder and attempt count depend only on its own transitions, so
    the row ends as its last transition left it (its deadline is that of its
    last lease), and each charged release counted once adds one attempt.
    Rows given back and still READY are handed out first, in the order of
    their last release. ADD records are applied as they come: they only
    append rows. Per record only lists grow; the checks are made at the end.
    """

    _DONE = 255  # per-record state code: the states are the results' own

    def __init__(self) -> None:
        self.rows: list[np.ndarray] = []
        self.code: list[int] = []  # per record: State, or _DONE
        self.known: list[int] = []  # per record: the rows the ledger had then
        self.ops: list[Op] = []
        self.droid: list[int] = []  # per record: the lease's droid, -1 for the others
        self.deadline: list[float] = []
        self.results: list[np.ndarray] = []  # states of the DONE records, in order
        self.charged: list[int] = []  # records of charged releases

    def _add(self, op: Op, rows: np.ndarray, n: int, code: int, droid: int, t: float) -> None:
        self.ops.append(op)
        self.rows.append(rows)
        self.code.append(code)
        self.known.append(n)
        self.droid.append(droid)
        self.deadline.append(t)

    def lease(self, rows: np.ndarray, n: int, droid: int, deadline: float) -> None:
        self._add(Op.LEASE, rows, n, int(State.LEASED), droid, deadline)

    def release(self, rows: np.ndarray, n: int, charge: bool) -> None:
        if charge:
            self.charged.append(len(self.rows))
        self._add(Op.RELEASE, rows, n, int(State.READY), -1, 0.0)

    def done(self, cols: np.ndarray, n: int) -> None:
        self.results.append(cols["state"])
        self._add(Op.DONE, cols["row"], n, self._DONE, -1, 0.0)

    def _check(self, rows: np.ndarray, lens: list[int], results: np.ndarray | None) -> None:
        """What applying record by record would have refused, named by its record."""
        bad = (rows < 0) | (rows >= np.repeat(np.asarray(self.known), lens))
        if bad.any():
            rec = int(np.repeat(np.arange(len(lens)), lens)[np.argmax(bad)])
            raise PilotError(
                ErrorCode.FILEHANDLINGFAILURE,
                f"bad {self.ops[rec].name} record (transition {rec + 1}): a row out of range",
            )
        if (
            results is not None
            and not ((results >= State.FINISHED) & (results <= State.FATAL)).all()
        ):
            raise PilotError(ErrorCode.FILEHANDLINGFAILURE, "bad DONE record: a state not terminal")

    def apply(self, ledger: Ledger) -> None:
        if not self.rows:
            return
        lens = [len(r) for r in self.rows]
        rows = np.concatenate(self.rows).astype(np.int64, copy=False)
        seq = np.repeat(np.arange(len(lens)), lens)
        code = np.asarray(self.code, dtype=np.uint8)
        state = code[seq]
        from_done = state == self._DONE
        if self.results:
            state[from_done] = np.concatenate(self.results)
        self._check(rows, lens, state[from_done] if self.results else None)
        order = np.lexsort((seq, rows))  # by row, then in journal order
        ranked = rows[order]
        last = np.ones(len(order), dtype=bool)
        last[:-1] = ranked[1:] != ranked[:-1]
        final = order[last]
        table = ledger.rows
        end = state[final]
        droid = np.asarray(self.droid, dtype=np.int32)[seq[final]]
        table["state"][rows[final]] = end
        table["droid"][rows[final]] = np.where(end == State.LEASED, droid, -1)
        leased = order[state[order] == State.LEASED]  # lease entries, by row then journal order
        if len(leased):
            by_row = rows[leased]
            last_lease = leased[np.append(by_row[1:] != by_row[:-1], True)]
            due = np.asarray(self.deadline, dtype=np.float64)[seq[last_lease]]
            table["deadline"][rows[last_lease]] = due - ledger.t0
        back = final[end == State.READY]
        ledger._released.extend(rows[back[np.argsort(seq[back], kind="stable")]].tolist())
        if self.charged:
            once = [np.unique(self.rows[i]) for i in self.charged]
            tries = np.bincount(np.concatenate(once).astype(np.int64), minlength=ledger.n)
            table["tries"][: ledger.n] = np.minimum(tries[: ledger.n], 255)
        states = table["state"][: ledger.n]
        ledger.counts[:] = np.bincount(states, minlength=len(State))[: len(State)]


def _apply(
    out: Replayed,
    rec: Record,
    done: list[tuple[np.ndarray, dict[str, Any]]],
    sent: list[np.ndarray],
    moves: _Transitions,
) -> None:
    ledger, meta, data = out.ledger, rec.meta, rec.data
    if rec.op is Op.ADD:
        for fref, f in meta["f"].items():
            got, _ = ledger.intern_file(*f)
            if got != int(fref):
                raise ValueError(f"file table out of step: {fref} != {got}")
        ledger.add_block(int(meta["j"]), data)
    elif rec.op is Op.LEASE:
        moves.lease(data, ledger.n, int(meta["d"]), float(meta["t"]))
    elif rec.op is Op.RELEASE:
        moves.release(data, ledger.n, bool(meta["c"]))
    elif rec.op is Op.DONE:
        n = len(data)
        for key in ("p", "a", "e"):  # the strings themselves are read where needed
            texts = meta[key]
            if not isinstance(texts, str) and not (isinstance(texts, list) and len(texts) == n):
                raise ValueError(f"{key!r} is not {n} strings")
        moves.done(data, ledger.n)
        done.append((data, meta))
        if out.done is not None:
            out.done.append((int(meta["d"]), _done_batch(data, meta)))
    elif rec.op is Op.SENT:
        sent.append(data)
    elif rec.op is Op.JOB:
        job = meta["job"]
        out.jobs.append(job)
        ledger.add_job(int(job["PandaID"]), _task_id(job))
    elif rec.op is Op.EPOCH:
        out.epoch = int(meta["n"])


def journal_results(path: str | Path) -> list[tuple[int, RangeResult]]:
    """Every result the journal holds, with the droid rank that sent it (-1: Yoda's own)."""
    rep = replay(path, keep_done=True)
    out = []
    for droid, batch in rep.done:
        ids = rep.ledger.range_ids(batch.rows)
        out.extend((droid, r) for r in batch.results(ids))
    return out


def cut_torn_tail(path: str | Path, end: int) -> None:
    """Drop what follows the last whole record (``end``), so that new records follow
    whole ones: a writer killed mid-record leaves a torn tail."""
    with open(path, "r+b") as fh:
        fh.truncate(end)


def open_journal(path: str | Path) -> Journal:
    """A new journal as ``pilot hpc`` and ``pilot run``'s event service write it
    (docs/DESIGN.md, "Durability"): group commit, records held during a turn of the
    loop and handed to the OS in one write before any message that depends on them, one
    fsync before each upstream call (:meth:`yoda.master.Yoda._durable`). The benchmarks
    open theirs here too."""
    return Journal(path, group=True)


def new_book(path: str | Path) -> tuple[Book, int]:
    """A new ledger behind a new journal at ``path`` (:func:`open_journal`), in epoch 1."""
    book = Book(Ledger(t0=time.time()), open_journal(path))
    book.epoch(1)
    return book, 1


def resume_book(
    path: str | Path, *, sync_every: int = 256, group: bool = False
) -> tuple[Book, int]:
    """Replay ``path``, then keep journaling to it. Leases of the dead incarnation go back
    to READY without charging an attempt (the droids were killed with Yoda). Returns the
    book and the new epoch."""
    rep = replay(path)
    if rep.torn:
        cut_torn_tail(path, rep.end)
    book = Book(rep.ledger, Journal(path, sync_every=sync_every, group=group))
    book.jobs = rep.jobs
    book.unsent = rep.unsent
    epoch = rep.epoch + 1
    book.epoch(epoch)
    book.release(rep.ledger.leased(), charge=False)
    return book, epoch


def main(argv: list[str] | None = None) -> int:
    """``pilot hpc journal PATH``: what a journal holds, for operators and reports
    (the binary format is not for reading by eye)."""
    p = argparse.ArgumentParser(prog="pilot hpc journal", description=main.__doc__)
    p.add_argument("path", help="a yoda.journal")
    p.add_argument(
        "--results",
        action="store_true",
        help="one JSON line per result: droid rank and the RangeResult fields",
    )
    args = p.parse_args(argv)
    try:
        if args.results:
            for droid, r in journal_results(args.path):
                print(json.dumps({"droid": droid, **r.to_dict()}))
            return 0
        rep = replay(args.path)
    except PilotError as exc:
        print(f"pilot hpc journal: {exc}", file=sys.stderr)
        return 1
    led = rep.ledger
    summary = {
        "epoch": rep.epoch,
        "records": rep.records,
        "torn": rep.torn,
        "jobs": [int(j["PandaID"]) for j in rep.jobs],
        "ranges": led.n,
        "states": {s.name.lower(): led.count(s) for s in State},
        "unsent": len(rep.unsent),
    }
    print(json.dumps(summary))
    return 0
