"""WORK and UPDATE bodies: ranges and results as numpy columns, not an object each.

Rank 0 touches every range of the allocation at least twice (hand it out,
take its result back), and a Python object per range per step was most of
its CPU. A batch therefore travels as one structured array, which mpi4py
pickles as a single buffer, plus only the strings that cannot be numbers:
the input files of the batch (a handful: thousands of ranges share a file)
and, per result, its output path, checksum and error text.

A range id ``<jediTaskID>-<PandaID>-<fileID>-<jobProcessID>-<attemptNr>`` is
sent as its numbers; ``key`` is a 64-bit hash of them that the Droid echoes
back with the result, so that Yoda can check a result belongs to the row it
names without formatting a single id.

Bodies from the other side are checked (:meth:`WorkBatch.from_body`,
:meth:`ResultBatch.from_body` raise ``ValueError``): a malformed message is
dropped whole and logged, never half applied.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np

from pilot.eventservice.model import RangeResult, RangeStatus
from pilot.job import EventRange

WORK_DTYPE = np.dtype(
    [
        ("row", "<i8"),  # ledger row: the handle of the lease
        ("key", "<u8"),  # hash of the id's numbers, echoed in the result
        ("job", "<u4"),  # index into WorkBatch.jobs
        ("file_id", "<i8"),
        ("proc", "<u4"),
        ("attempt", "<u2"),
        ("start", "<i8"),
        ("nev", "<u4"),
        ("fref", "<u4"),  # index into WorkBatch.files
    ]
)

RESULT_DTYPE = np.dtype(
    [
        ("row", "<i8"),
        ("key", "<u8"),
        ("state", "u1"),  # FINISHED, FAILED or FATAL below (the ledger's own values)
        ("fsize", "<i8"),
        ("cpu", "<f8"),
        ("wall", "<f8"),
        ("error_code", "<i4"),
    ]
)

# Terminal states as numbers; yoda.ledger.State uses the same values.
FINISHED, FAILED, FATAL = 2, 3, 4
STATE_OF_STATUS = {
    RangeStatus.FINISHED: FINISHED,
    RangeStatus.FAILED: FAILED,
    RangeStatus.FATAL: FATAL,
}
STATUS_OF_STATE = {v: k for k, v in STATE_OF_STATUS.items()}
_STATUS_TEXT = {v: k.value for k, v in STATE_OF_STATUS.items()}

ID_DTYPE = np.dtype([("job", "<u4"), ("file_id", "<i8"), ("proc", "<u4"), ("attempt", "<u2")])


def format_range_ids(jobs: dict[int, tuple[int, int]], cols: np.ndarray) -> list[str]:
    """``<taskID>-<PandaID>-<fileID>-<jobProcessID>-<attemptNr>`` from :data:`ID_DTYPE`
    columns and ``jobs`` (job index -> (taskID, PandaID))."""
    job, file_id, attempt = cols["job"], cols["file_id"], cols["attempt"]
    if len(job) and (job == job[0]).all():  # one job: its prefix once
        task, panda = jobs[int(job[0])]
        pre = f"{task}-{panda}-"
        if (file_id == file_id[0]).all() and (attempt == attempt[0]).all():
            # and one file and attempt, the common case: one number to format per id
            pre, post = f"{pre}{file_id[0]}-", f"-{attempt[0]}"
            return [f"{pre}{p}{post}" for p in cols["proc"].tolist()]
        rest = zip(file_id.tolist(), cols["proc"].tolist(), attempt.tolist())
        return [f"{pre}{f}-{p}-{a}" for f, p, a in rest]
    rest = zip(file_id.tolist(), cols["proc"].tolist(), attempt.tolist())
    return [f"{jobs[j][0]}-{jobs[j][1]}-{f}-{p}-{a}" for j, (f, p, a) in zip(job.tolist(), rest)]


_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
_C1, _C2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray, t: np.ndarray) -> None:
    """splitmix64 finaliser, in place (``t``: scratch of the same shape): spreads
    structured integers over 64 bits. In place, because rank 0 keys every range three
    times and a temporary per step cost more than the arithmetic."""
    np.right_shift(x, _S30, out=t)
    np.bitwise_xor(x, t, out=x)
    np.multiply(x, _C1, out=x)
    np.right_shift(x, _S27, out=t)
    np.bitwise_xor(x, t, out=x)
    np.multiply(x, _C2, out=x)
    np.right_shift(x, _S31, out=t)
    np.bitwise_xor(x, t, out=x)


def range_key(panda_id: Any, file_id: Any, proc: Any, attempt: Any) -> np.ndarray:
    """64-bit key of range ids given their numeric parts (vectorised)."""
    parts = (
        np.asarray(panda_id, dtype=np.uint64),
        np.asarray(file_id, dtype=np.int64).astype(np.uint64),
        np.asarray(proc, dtype=np.uint64),
        np.asarray(attempt, dtype=np.uint64),
    )
    k = np.array(np.broadcast_to(parts[0], np.broadcast_shapes(*(p.shape for p in parts))))
    t = np.empty_like(k)
    with np.errstate(over="ignore"):
        _mix(k, t)
        for part in parts[1:]:
            np.bitwise_xor(k, part, out=k)
            _mix(k, t)
    return k


def _array(value: Any, dtype: np.dtype, what: str) -> np.ndarray:
    if not isinstance(value, np.ndarray) or value.dtype != dtype or value.ndim != 1:
        raise ValueError(f"{what} is not a column batch")
    return value


def pack_texts(texts: list[str]) -> str | list[str]:
    """A string column as it travels and is journaled: one string when every entry is
    that string (no output path, no checksum, no error: the common case), else the
    list. A result then costs no Python object of its own on the wire."""
    if texts and texts.count(texts[0]) == len(texts):
        return texts[0]
    return texts


def unpack_texts(value: Any, n: int, what: str) -> list[str]:
    """The column of ``n`` strings that :func:`pack_texts` gave ``value`` for."""
    if isinstance(value, str):
        return [value] * n
    if not isinstance(value, list) or len(value) != n or not set(map(type, value)) <= {str}:
        raise ValueError(f"{what}: expected {n} strings")
    return value


@dataclass
class WorkBatch:
    """Ranges leased to one droid."""

    cols: np.ndarray  # WORK_DTYPE
    jobs: dict[int, tuple[int, int]]  # job index -> (jediTaskID, PandaID)
    files: dict[int, tuple[str, str, str, str]]  # fref -> (LFN, GUID, scope, PFN)
    no_more: bool = False

    def __len__(self) -> int:
        return len(self.cols)

    @classmethod
    def none_left(cls) -> WorkBatch:
        return cls(np.zeros(0, dtype=WORK_DTYPE), {}, {}, no_more=True)

    def body(self) -> dict[str, Any]:
        return {"cols": self.cols, "jobs": self.jobs, "files": self.files, "no_more": self.no_more}

    @classmethod
    def from_body(cls, body: Any) -> WorkBatch:
        if not isinstance(body, dict):
            raise ValueError("WORK body is not a dict")
        cols = _array(body.get("cols"), WORK_DTYPE, "WORK cols")
        jobs, files = body.get("jobs"), body.get("files")
        if not isinstance(jobs, dict) or not isinstance(files, dict):
            raise ValueError("WORK without its job and file tables")
        for ids in jobs.values():
            if not (isinstance(ids, (tuple, list)) and len(ids) == 2):
                raise ValueError("WORK job entry is not (taskID, PandaID)")
            if not all(type(i) is int for i in ids):
                raise ValueError("WORK job entry is not (taskID, PandaID)")
        for f in files.values():
            if not (isinstance(f, (tuple, list)) and len(f) == 4):
                raise ValueError("WORK file entry is not (LFN, GUID, scope, PFN)")
            if not all(type(s) is str for s in f):
                raise ValueError("WORK file entry is not (LFN, GUID, scope, PFN)")
        if len(cols):
            if not set(np.unique(cols["job"]).tolist()) <= set(jobs):
                raise ValueError("WORK names a job it does not define")
            if not set(np.unique(cols["fref"]).tolist()) <= set(files):
                raise ValueError("WORK names a file it does not define")
        return cls(cols, jobs, files, bool(body.get("no_more")))

    def select(self, which: np.ndarray | slice) -> WorkBatch:
        """The ranges at ``which`` (mask, indices or slice), with the same tables."""
        return WorkBatch(self.cols[which], self.jobs, self.files)

    def ranges(self) -> list[tuple[int, int, int, EventRange]]:
        """``(row, key, PandaID, EventRange)`` per range: the one place ids become text."""
        jobs, files = self.jobs, self.files
        out = []
        for row, key, job, file_id, proc, attempt, start, nev, fref in self.cols.tolist():
            task, panda = jobs[job]
            lfn, guid, scope, pfn = files[fref]
            rid = f"{task}-{panda}-{file_id}-{proc}-{attempt}"
            out.append(
                (row, key, panda, EventRange(rid, start, start + nev - 1, lfn, guid, scope, pfn))
            )
        return out


@dataclass
class ResultBatch:
    """Results of ranges, as the droid sends them and Yoda journals and reports them."""

    cols: np.ndarray  # RESULT_DTYPE
    path: list[str]  # output after its rename into place, or ""
    adler32: list[str]
    diag: list[str]

    def __len__(self) -> int:
        return len(self.cols)

    @property
    def rows(self) -> np.ndarray:
        return self.cols["row"]

    @classmethod
    def empty(cls) -> ResultBatch:
        return cls(np.zeros(0, dtype=RESULT_DTYPE), [], [], [])

    @classmethod
    def from_results(cls, items: Sequence[tuple[int, int, RangeResult]]) -> ResultBatch:
        """From ``(row, key, result)`` triples, as the executors hand results to a Droid."""
        cols = np.zeros(len(items), dtype=RESULT_DTYPE)
        if items:
            results = [r for _, _, r in items]
            cols["row"] = [i[0] for i in items]
            cols["key"] = [i[1] for i in items]
            cols["state"] = [STATE_OF_STATUS[r.status] for r in results]
            cols["fsize"] = [r.fsize for r in results]
            cols["cpu"] = [r.cpu for r in results]
            cols["wall"] = [r.wall for r in results]
            cols["error_code"] = [r.error_code for r in results]
            return cls(
                cols,
                [r.output_path for r in results],
                [r.adler32 for r in results],
                [r.error_diag for r in results],
            )
        return cls.empty()

    @classmethod
    def failed(
        cls, rows: np.ndarray, keys: np.ndarray, code: int, diag: str, state: int = FAILED
    ) -> ResultBatch:
        """The same failure for every row (e.g. a range that lost its lease too often)."""
        cols = np.zeros(len(rows), dtype=RESULT_DTYPE)
        cols["row"], cols["key"] = rows, keys
        cols["state"], cols["error_code"] = state, code
        n = len(rows)
        return cls(cols, [""] * n, [""] * n, [diag] * n)

    def packed_texts(self) -> tuple[str | list[str], str | list[str], str | list[str]]:
        """Paths, checksums and diagnostics as they travel and are journaled
        (:func:`pack_texts`); :meth:`unpacked` takes them back."""
        return pack_texts(self.path), pack_texts(self.adler32), pack_texts(self.diag)

    @classmethod
    def unpacked(cls, cols: np.ndarray, path: Any, adler: Any, diag: Any) -> ResultBatch:
        """From columns and packed string columns; ``ValueError`` if they do not fit."""
        n = len(cols)
        return cls(
            cols,
            unpack_texts(path, n, "result paths"),
            unpack_texts(adler, n, "result checksums"),
            unpack_texts(diag, n, "result diagnostics"),
        )

    def body(self) -> dict[str, Any]:
        path, adler, diag = self.packed_texts()
        return {"cols": self.cols, "path": path, "adler": adler, "diag": diag}

    def __reduce__(self) -> tuple[Any, ...]:  # to the link process: packed, as on the wire
        return (ResultBatch.unpacked, (self.cols, *self.packed_texts()))

    @classmethod
    def from_body(cls, body: Any) -> ResultBatch:
        if not isinstance(body, dict):
            raise ValueError("result body is not a dict")
        if body.get("cols") is None:
            return cls.empty()
        cols = _array(body["cols"], RESULT_DTYPE, "result cols")
        state = cols["state"]
        if len(cols) and not ((state >= FINISHED) & (state <= FATAL)).all():
            raise ValueError("result with a state that is not terminal")
        return cls.unpacked(cols, body.get("path"), body.get("adler"), body.get("diag"))

    def select(self, which: np.ndarray | slice) -> ResultBatch:
        """The results at ``which`` (a boolean mask, indices or a slice)."""
        if isinstance(which, slice):  # a cut: list slices, no loop per result
            return ResultBatch(
                self.cols[which], self.path[which], self.adler32[which], self.diag[which]
            )
        idx = np.flatnonzero(which) if which.dtype == bool else which
        if len(idx) == len(self):
            return self
        pick = idx.tolist()
        return ResultBatch(
            self.cols[idx],
            [self.path[i] for i in pick],
            [self.adler32[i] for i in pick],
            [self.diag[i] for i in pick],
        )

    @classmethod
    def concat(cls, batches: Sequence[ResultBatch]) -> ResultBatch:
        batches = [b for b in batches if len(b)]
        if len(batches) == 1:
            return batches[0]
        if not batches:
            return cls.empty()
        return cls(
            # dtype given: numpy would otherwise promote the record types in Python,
            # which cost more than the copy
            np.concatenate([b.cols for b in batches], dtype=RESULT_DTYPE),
            list(chain.from_iterable(b.path for b in batches)),
            list(chain.from_iterable(b.adler32 for b in batches)),
            list(chain.from_iterable(b.diag for b in batches)),
        )

    def results(self, ids: Sequence[str]) -> list[RangeResult]:
        """As :class:`RangeResult` objects, given each row's range id."""
        out = []
        for i, (_, _, state, fsize, cpu, wall, code) in enumerate(self.cols.tolist()):
            out.append(
                RangeResult(
                    ids[i],
                    STATUS_OF_STATE[state],
                    self.path[i],
                    fsize,
                    self.adler32[i],
                    cpu,
                    wall,
                    code,
                    self.diag[i],
                )
            )
        return out

    def panda_entries(self, ids: Sequence[str]) -> list[dict[str, Any]]:
        """``updateEventRanges`` v0 entries, the same as ``RangeResult.to_panda_v0``."""
        text = _STATUS_TEXT
        state = self.cols["state"]
        if len(state) and (state == state[0]).all():  # all finished, say: one status
            status = text[int(state[0])]
            out = [{"eventRangeID": rid, "eventStatus": status} for rid in ids]
        else:
            out = [
                {"eventRangeID": rid, "eventStatus": text[s]} for rid, s in zip(ids, state.tolist())
            ]
        codes = self.cols["error_code"]
        for i in np.flatnonzero(self.cols["state"] != FINISHED).tolist():
            out[i]["errorCode"] = int(codes[i])
            out[i]["errorDiag"] = self.diag[i][:256]
        cpu = self.cols["cpu"]
        for i in np.flatnonzero(cpu != 0).tolist():
            out[i]["cpuConsumptionTime"] = round(float(cpu[i]), 3)
        return out
