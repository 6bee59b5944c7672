"""The range ledger: where every event range of the allocation stands.

One row per range in a numpy structured array, so a million ranges cost tens
of megabytes, not the gigabyte a dict per range would. The range id is not
stored as text: ``<jediTaskID>-<PandaID>-<fileID>-<jobProcessID>-<attemptNr>``
is rebuilt from the job index (task and PandaID live in the small job table)
and three integer columns. LFN, GUID, scope and PFN are interned per file,
since thousands of ranges share one input file.

States: READY -> LEASED (droid, deadline) -> FINISHED | FAILED | FATAL, or
back to READY when the lease is released (droid died, lease expired, drained
before it started). The ledger only applies transitions; the journal
(:mod:`yoda.journal`) records each one first, and the scheduler decides them.

Lookup by id (duplicate ranges from upstream, late messages) uses a 64-bit
hash of the id's numbers kept in a few sorted runs merged like an LSM tree:
adding a batch costs a sort of that batch, lookups a binary search per run.
A bit per hash (8 bits per range) in front of the runs tells nearly every new
range from a known one without a search.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import numpy as np

from hpc import wire
from hpc.wire import WorkBatch, range_key
from pilot.errors import ErrorCode, PilotError
from pilot.job import EventRange


class State(IntEnum):
    READY = 0
    LEASED = 1
    FINISHED = wire.FINISHED  # terminal states travel as these numbers in UPDATE
    FAILED = wire.FAILED
    FATAL = wire.FATAL


TERMINAL = (State.FINISHED, State.FAILED, State.FATAL)

RANGE_DTYPE = np.dtype(
    [
        ("job", "<u4"),  # index into the job table
        ("file_id", "<i8"),
        ("proc", "<u4"),  # jobProcessID
        ("attempt", "<u2"),  # attemptNr of the id (PanDA's, not ours)
        ("state", "u1"),
        ("tries", "u1"),  # leases lost to a dead droid or an expired lease
        ("start", "<i8"),
        ("nev", "<u4"),  # lastEvent - startEvent + 1
        ("fref", "<u4"),  # index into the file table
        ("droid", "<i4"),  # rank holding the lease, -1 if none
        ("deadline", "<f4"),  # lease deadline, seconds after Ledger.t0
    ]
)


ADD_DTYPE = np.dtype(  # ranges as they are added (and journaled: yoda.journal ADD records)
    [
        ("file_id", "<i8"),
        ("proc", "<u4"),
        ("attempt", "<u2"),
        ("start", "<i8"),
        ("last", "<i8"),
        ("fref", "<u4"),
    ]
)


def columns_of(ranges: Sequence[EventRange]) -> tuple[np.ndarray, list[tuple[str, ...]]]:
    """:class:`EventRange` objects as :data:`ADD_DTYPE` columns; ``fref`` indexes the
    returned list of distinct ``(lfn, guid, scope, pfn)``."""
    cols = np.zeros(len(ranges), dtype=ADD_DTYPE)
    files: dict[tuple[str, ...], int] = {}
    parts = []
    for r in ranges:
        _, _, file_id, proc, attempt = (int(p) for p in r.event_range_id.split("-"))
        fref = files.setdefault((r.lfn, r.guid, r.scope, r.pfn), len(files))
        parts.append((file_id, proc, attempt, r.start_event, r.last_event, fref))
    if parts:
        cols[:] = parts
    return cols, list(files)


@dataclass(frozen=True)
class JobEntry:
    panda_id: int
    task_id: int


def _rising(rows: np.ndarray) -> bool:
    """Strictly rising, so sorted and without repeats (as rows handed out in order are)."""
    return len(rows) < 2 or bool((rows[1:] > rows[:-1]).all())


def _distinct(values: np.ndarray) -> list[int]:
    """The distinct values, sorted; at once when all are one (the common case)."""
    if not len(values):
        return []
    if (values == values[0]).all():
        return [int(values[0])]
    return np.unique(values).tolist()


def parse_range_id(rid: str) -> tuple[int, int, int, int, int]:
    try:
        task, panda, file_id, proc, attempt = (int(p) for p in rid.split("-"))
    except ValueError:
        raise PilotError(ErrorCode.MESSAGEHANDLINGFAILURE, f"bad eventRangeID {rid!r}") from None
    return task, panda, file_id, proc, attempt


class Ledger:
    """All ranges of all jobs of one allocation."""

    def __init__(self, capacity: int = 1024, t0: float = 0.0) -> None:
        self.t0 = t0
        self.rows = np.zeros(max(16, capacity), dtype=RANGE_DTYPE)
        self.n = 0
        self.jobs: list[JobEntry] = []
        self._job_index: dict[int, int] = {}
        self._panda = np.zeros(0, dtype=np.uint64)  # PandaID by job index, for keys
        self.files: list[tuple[str, str, str, str]] = []
        self._file_index: dict[tuple[str, str, str, str], int] = {}
        self._runs: list[tuple[np.ndarray, np.ndarray]] = []  # (sorted keys, rows)
        self._bits = np.zeros(1024, dtype=np.uint8)  # key filter: 8 bits per range
        self._cursor = 0  # rows below it are not READY unless in _released
        self._released: collections.deque[int] = collections.deque()
        self.counts = np.zeros(len(State), dtype=np.int64)

    # -- jobs, files, ranges -------------------------------------------------

    def add_job(self, panda_id: int, task_id: int) -> int:
        idx = self._job_index.get(panda_id)
        if idx is None:
            idx = len(self.jobs)
            self.jobs.append(JobEntry(panda_id, task_id))
            self._job_index[panda_id] = idx
            self._panda = np.append(self._panda, np.uint64(panda_id))
        return idx

    def job_of(self, panda_id: int) -> int | None:
        return self._job_index.get(panda_id)

    def intern_file(self, lfn: str, guid: str, scope: str, pfn: str) -> tuple[int, bool]:
        key = (lfn, guid, scope, pfn)
        idx = self._file_index.get(key)
        if idx is not None:
            return idx, False
        idx = len(self.files)
        self.files.append(key)
        self._file_index[key] = idx
        return idx, True

    def intern_files(
        self, cols: np.ndarray, files: Sequence[tuple[str, ...]]
    ) -> tuple[np.ndarray, dict[int, list[str]]]:
        """``cols`` (a copy) with ``fref`` turned from an index into ``files`` into the
        file table's, and the files that were new there (fref -> [lfn, guid, scope, pfn])."""
        fresh: dict[int, list[str]] = {}
        table = np.zeros(len(files), dtype=np.uint32)
        for i, f in enumerate(files):
            table[i], new = self.intern_file(*f)
            if new:
                fresh[int(table[i])] = list(f)
        cols = cols.copy()
        cols["fref"] = table[cols["fref"]]
        return cols, fresh

    def _grow(self, extra: int) -> None:
        need = self.n + extra
        if need <= len(self.rows):
            return
        cap = max(need, 2 * len(self.rows))
        try:  # in place (realloc: the pages move, nothing is copied or touched again)
            self.rows.resize(cap, refcheck=True)
        except ValueError:  # a view of the table is alive somewhere: copy instead
            bigger = np.zeros(cap, dtype=RANGE_DTYPE)
            bigger[: self.n] = self.rows[: self.n]
            self.rows = bigger

    def reserve(self, total: int) -> None:
        """Size the table for ``total`` ranges at once (no growth slack)."""
        self._grow(max(0, total - self.n))

    def add_columns(
        self,
        job: int,
        file_id: np.ndarray,
        proc: np.ndarray,
        attempt: np.ndarray,
        start: np.ndarray,
        last: np.ndarray,
        fref: np.ndarray,
    ) -> np.ndarray:
        """Append READY ranges given as columns; returns their rows. Duplicates are skipped."""
        file_id = np.asarray(file_id, dtype=np.int64)
        proc = np.asarray(proc, dtype=np.uint32)
        attempt = np.asarray(attempt, dtype=np.uint16)
        keys = range_key(np.full(len(file_id), self._panda[job]), file_id, proc, attempt)
        # one sort serves both checks and the new index run: the first of each key in
        # the batch (stable: its earliest), unless an earlier batch had it
        order = np.argsort(keys, kind="stable")
        ks = keys[order]
        new = np.ones(len(ks), dtype=bool)
        new[1:] = ks[1:] != ks[:-1]
        new &= ~self._contains(ks)
        keep = np.zeros(len(keys), dtype=bool)
        keep[order[new]] = True
        m = int(keep.sum())
        self._grow(m)
        sl = slice(self.n, self.n + m)
        block = self.rows[sl]
        block["job"] = job
        block["file_id"] = file_id[keep]
        block["proc"] = proc[keep]
        block["attempt"] = attempt[keep]
        block["state"] = State.READY
        block["tries"] = 0
        start = np.asarray(start, dtype=np.int64)[keep]
        block["start"] = start
        block["nev"] = np.asarray(last, dtype=np.int64)[keep] - start + 1
        block["fref"] = np.asarray(fref, dtype=np.uint32)[keep]
        block["droid"] = -1
        block["deadline"] = 0
        rows = np.arange(self.n, self.n + m, dtype=np.int64)
        row_of = self.n + np.cumsum(keep) - 1  # where each kept range of the batch lands
        self._add_run(ks[new], row_of[order[new]])
        self.n += m
        self.counts[State.READY] += m
        return rows

    def add_block(self, job: int, cols: np.ndarray) -> np.ndarray:
        """Append READY ranges given as :data:`ADD_DTYPE` columns (``fref`` already
        interned); returns their rows. Duplicates are skipped."""
        return self.add_columns(
            job,
            cols["file_id"],
            cols["proc"],
            cols["attempt"],
            cols["start"],
            cols["last"],
            cols["fref"],
        )

    def add_ranges(self, ranges: list[EventRange]) -> np.ndarray:
        """Append validated ranges (a job unknown so far is added); returns the new rows."""
        out = []
        by_job: dict[int, list[EventRange]] = {}
        for r in ranges:
            task, panda, _, _, _ = parse_range_id(r.event_range_id)
            job = self._job_index.get(panda)
            if job is None:
                job = self.add_job(panda, task)
            by_job.setdefault(job, []).append(r)
        for job, group in by_job.items():
            cols, _ = self.intern_files(*columns_of(group))
            out.append(self.add_block(job, cols))
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def _add_run(self, keys: np.ndarray, rows: np.ndarray) -> None:
        """Index new ``keys`` (sorted) of ``rows``."""
        if not len(keys):  # a batch of duplicates only
            return
        self._runs.append((keys, rows.astype(np.uint32)))
        while len(self._runs) > 1 and len(self._runs[-2][0]) <= 2 * len(self._runs[-1][0]):
            (k2, r2), (k1, r1) = self._runs.pop(), self._runs.pop()
            k = np.concatenate([k1, k2])
            r = np.concatenate([r1, r2])
            order = np.argsort(k, kind="stable")  # two sorted runs: a linear merge
            self._runs.append((k[order], r[order]))
        total = sum(len(k) for k, _ in self._runs)
        if total > len(self._bits):  # more than a key per 8 bits: a bigger filter
            size = len(self._bits)
            while total > size:
                size *= 2
            self._bits = np.zeros(size, dtype=np.uint8)
            for k, _ in self._runs:
                self._mark(k)
        else:
            self._mark(keys)

    def _bit(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        at = (keys & np.uint64(8 * len(self._bits) - 1)).astype(np.intp)
        return at >> 3, (at & 7).astype(np.uint8)

    def _mark(self, keys: np.ndarray) -> None:
        byte, bit = self._bit(keys)
        np.bitwise_or.at(self._bits, byte, np.left_shift(np.uint8(1), bit))

    def _contains(self, keys: np.ndarray) -> np.ndarray:
        """Which of ``keys`` (sorted) are known. A bit per key hash (8 bits per range)
        answers "no" for nearly all new keys; only the rest are looked up in the runs."""
        byte, bit = self._bit(keys)
        maybe = np.flatnonzero((self._bits[byte] >> bit) & 1)
        found = np.zeros(len(keys), dtype=bool)
        if not len(maybe):
            return found
        probe = keys[maybe]
        hit = np.zeros(len(probe), dtype=bool)
        for run_keys, _ in self._runs:
            pos = np.searchsorted(run_keys, probe)
            pos[pos >= len(run_keys)] = 0
            hit |= run_keys[pos] == probe if len(run_keys) else False
        found[maybe] = hit
        return found

    def find(self, rid: str) -> int | None:
        """Row of a range id, or None if unknown."""
        try:
            task, panda, file_id, proc, attempt = parse_range_id(rid)
        except PilotError:
            return None
        job = self._job_index.get(panda)
        if job is None:
            return None
        key = range_key([panda], [file_id], [proc], [attempt])
        for run_keys, run_rows in self._runs:
            lo = int(np.searchsorted(run_keys, key[0]))
            while lo < len(run_keys) and run_keys[lo] == key[0]:
                row = int(run_rows[lo])
                r = self.rows[row]
                if (
                    r["job"] == job
                    and r["file_id"] == file_id
                    and r["proc"] == proc
                    and r["attempt"] == attempt
                ):
                    return row
                lo += 1
        return None

    def range_id(self, row: int) -> str:
        job, file_id, proc, attempt = self.rows[row].item()[:4]  # .item(): one C call, not four
        j = self.jobs[job]
        return f"{j.task_id}-{j.panda_id}-{file_id}-{proc}-{attempt}"

    def id_parts(self, rows: np.ndarray) -> tuple[dict[int, tuple[int, int]], np.ndarray]:
        """What the ids of ``rows`` are made of: (job index -> (taskID, PandaID), columns)."""
        cols = np.zeros(len(rows), dtype=wire.ID_DTYPE)
        for name, col in zip(wire.ID_DTYPE.names, self._cols(rows, *wire.ID_DTYPE.names)):
            cols[name] = col
        return self._job_ids(cols["job"]), cols

    def _job_ids(self, job: np.ndarray) -> dict[int, tuple[int, int]]:
        """Job index -> (taskID, PandaID) for the jobs in column ``job``."""
        return {j: (self.jobs[j].task_id, self.jobs[j].panda_id) for j in _distinct(job)}

    def range_ids(self, rows: np.ndarray) -> list[str]:
        return wire.format_range_ids(*self.id_parts(rows))

    def event_range(self, row: int) -> EventRange:
        job, file_id, proc, attempt, _, _, start, nev, fref, _, _ = self.rows[row].item()
        j = self.jobs[job]
        lfn, guid, scope, pfn = self.files[fref]
        rid = f"{j.task_id}-{j.panda_id}-{file_id}-{proc}-{attempt}"
        return EventRange(rid, start, start + nev - 1, lfn, guid, scope, pfn)

    def _cols(self, rows: np.ndarray, *names: str) -> list[np.ndarray]:
        """Columns ``names`` of ``rows`` (valid row numbers): views when the rows are one
        rising run, as leases and their results nearly always are, else a gather per
        column. Gathering whole records of this table costs several times more."""
        n = len(rows)
        if n and int(rows[-1]) - int(rows[0]) == n - 1 and _rising(rows):
            run = slice(int(rows[0]), int(rows[0]) + n)
            return [self.rows[name][run] for name in names]
        return [self.rows[name][rows] for name in names]

    def _keys_of(
        self, job: np.ndarray, file_id: np.ndarray, proc: np.ndarray, attempt: np.ndarray
    ) -> np.ndarray:
        return range_key(self._panda[job], file_id, proc, attempt)

    def keys(self, rows: np.ndarray) -> np.ndarray:
        """The 64-bit keys of ``rows`` (what a WORK batch carries and a result echoes)."""
        return self._keys_of(*self._cols(rows, "job", "file_id", "proc", "attempt"))

    def work_batch(self, rows: np.ndarray) -> WorkBatch:
        """``rows`` as a WORK body: their columns, keys, and the jobs and files they use."""
        names = ("job", "file_id", "proc", "attempt", "start", "nev", "fref")
        got = dict(zip(names, self._cols(rows, *names)))
        cols = np.zeros(len(rows), dtype=wire.WORK_DTYPE)
        cols["row"] = rows
        for name in names:
            cols[name] = got[name]
        cols["key"] = self._keys_of(got["job"], got["file_id"], got["proc"], got["attempt"])
        files = {f: self.files[f] for f in _distinct(got["fref"])}
        return WorkBatch(cols, self._job_ids(got["job"]), files)

    def held_by(self, rows: np.ndarray, keys: np.ndarray, droid: int) -> np.ndarray:
        """Mask of ``rows`` that exist, are leased to ``droid`` and have these ``keys``.

        A row named twice counts once (its first time)."""
        ok = (rows >= 0) & (rows < self.n)
        if not _rising(rows):  # perhaps a row named twice
            _, first = np.unique(rows, return_index=True)
            once = np.zeros(len(rows), dtype=bool)
            once[first] = True
            ok &= once
        idx = np.flatnonzero(ok)
        r = rows[idx]
        state, holder, *id_cols = self._cols(
            r, "state", "droid", "job", "file_id", "proc", "attempt"
        )
        good = (state == State.LEASED) & (holder == droid)
        good &= self._keys_of(*id_cols) == keys[idx]
        ok[idx[~good]] = False
        return ok

    # -- transitions ---------------------------------------------------------

    def state(self, row: int) -> State:
        return State(int(self.rows[row]["state"]))

    def next_ready(self, n: int) -> np.ndarray:
        """Up to ``n`` READY rows, released ones first (they waited longest)."""
        st = self.rows["state"]
        taken: list[int] = []
        while self._released and len(taken) < n:
            row = self._released.popleft()
            if st[row] == State.READY:
                taken.append(row)
        out = np.unique(np.asarray(taken, dtype=np.int64)) if taken else None
        parts = [out] if out is not None else []
        got = len(out) if out is not None else 0
        while got < n and self._cursor < self.n:
            end = min(self.n, self._cursor + 4 * (n - got) + 64)
            idx = np.flatnonzero(st[self._cursor : end] == State.READY) + self._cursor
            if out is not None and len(idx):  # a released row may lie ahead of the cursor
                idx = idx[~np.isin(idx, out)]
            idx = idx[: n - got]
            parts.append(idx)
            got += len(idx)
            self._cursor = int(idx[-1]) + 1 if got == n and len(idx) else end
        if not parts:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate(parts).astype(np.int64, copy=False)

    def _set(self, rows: np.ndarray, state: State) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        if not _rising(rows):
            rows = np.unique(rows)
        if len(rows):
            st = self.rows["state"]
            self.counts -= np.bincount(st[rows], minlength=len(State))[: len(State)]
            self.counts[state] += len(rows)
            st[rows] = state
        return rows

    def lease(self, rows: Any, droid: int, deadline: float) -> None:
        rows = self._set(rows, State.LEASED)
        self.rows["droid"][rows] = droid
        self.rows["deadline"][rows] = deadline - self.t0

    def extend(self, rows: Any, deadline: float) -> None:
        self.rows["deadline"][np.asarray(rows, dtype=np.int64)] = deadline - self.t0

    def release(self, rows: Any, charge: bool) -> None:
        rows = self._set(rows, State.READY)
        self.rows["droid"][rows] = -1
        if charge and len(rows):
            tries = self.rows["tries"][rows]
            self.rows["tries"][rows] = np.minimum(tries.astype(np.int64) + 1, 255)
        self._released.extend(rows.tolist())

    def finish(self, rows: Any, state: State) -> None:
        if state not in TERMINAL:
            raise ValueError(f"{state} is not terminal")
        rows = self._set(rows, state)
        self.rows["droid"][rows] = -1

    # -- queries -------------------------------------------------------------

    def leased_by(self, droid: int) -> np.ndarray:
        r = self.rows[: self.n]
        return np.flatnonzero((r["state"] == State.LEASED) & (r["droid"] == droid))

    def leased(self) -> np.ndarray:
        return np.flatnonzero(self.rows["state"][: self.n] == State.LEASED)

    def count(self, state: State) -> int:
        return int(self.counts[state])

    def all_terminal(self) -> bool:
        return self.count(State.READY) == 0 and self.count(State.LEASED) == 0

    def nbytes(self) -> int:
        """Bytes held for the ranges themselves (table, id index), not the job/file tables."""
        index = sum(k.nbytes + r.nbytes for k, r in self._runs) + self._bits.nbytes
        return int(self.rows.nbytes + index)
