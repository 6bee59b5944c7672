"""Ranges from the upstream, validated in bulk into ledger columns.

``getEventRanges`` answers with a JSON list of dicts, one per range. Rank 0
turns each batch into :data:`yoda.journal.ADD_DTYPE` columns without making
an object per range: the ids are checked and turned into numbers as one
byte array, the integers are checked as arrays, and the file names (a handful per batch) are validated once each.

Anything unusual in a batch sends that batch down the slow path instead,
:func:`parse_ranges`, which judges range by range exactly as
:meth:`EventRange.from_panda` does and names what is wrong. Both paths accept
the same ranges (``tests/unit/test_yoda_parse.py``).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any

import numpy as np

from pilot.errors import ErrorCode, PilotError
from pilot.job import EventRange, check_lfn, is_null
from yoda.ledger import ADD_DTYPE, columns_of

_FIELDS = operator.itemgetter("eventRangeID", "startEvent", "lastEvent", "LFN", "GUID", "scope")
# the ledger's column widths: proc u32, attempt u16, events per range u32
_PROC_MAX, _ATTEMPT_MAX, _NEV_MAX = 2**32 - 1, 2**16 - 1, 2**32 - 1


def _text(value: Any) -> str | None:
    """A GUID, scope or PFN as :meth:`EventRange.from_panda` keeps it ("" for the null
    spellings); None if it is not a string at all."""
    if value is None:
        return ""
    if type(value) is not str:
        return None
    return "" if is_null(value) else value


def _plain_lfn(lfn: Any) -> bool:
    """An LFN :func:`check_lfn` accepts, printable, and not a null spelling."""
    if type(lfn) is not str or not lfn.isprintable() or is_null(lfn):
        return False
    try:
        check_lfn(lfn, "LFN")
    except PilotError:
        return False
    return True


def parse_ranges(items: list[Any]) -> list[EventRange | PilotError]:
    """Validate upstream ranges one by one with :meth:`EventRange.from_panda` (the one
    judge of a range, and its diagnostics)."""
    out: list[EventRange | PilotError] = []
    for d in items:
        try:
            out.append(EventRange.from_panda(d))
        except PilotError as exc:
            out.append(exc)
    return out


@dataclass
class Intake:
    """A validated batch of one job: columns whose ``fref`` indexes ``files``."""

    cols: np.ndarray
    files: list[tuple[str, ...]]
    errors: list[PilotError] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)  # ids of another job: dropped


def _fits(r: EventRange) -> bool:
    """Whether the ledger can hold ``r`` and give its id back unchanged."""
    parts = r.event_range_id.split("-")
    task, panda, file_id, proc, attempt = (int(p) for p in parts)
    return (
        all(p == str(int(p)) for p in parts)
        and max(task, panda, file_id) < 2**63
        and proc <= _PROC_MAX
        and attempt <= _ATTEMPT_MAX
        and r.last_event < 2**63
        and r.last_event - r.start_event < _NEV_MAX
    )


def range_columns(items: Any, panda_id: int) -> Intake:
    """The ranges of job ``panda_id`` in ``items`` (a ``getEventRanges`` answer)."""
    if type(items) is list and items:
        fast = _bulk(items, panda_id)
        if fast is not None:
            return fast
    if not isinstance(items, list):
        items = [items]
    good: list[EventRange] = []
    out = Intake(np.zeros(0, dtype=ADD_DTYPE), [])
    for r in parse_ranges(items):
        if isinstance(r, PilotError):
            out.errors.append(r)
        elif r.panda_id != panda_id:
            out.foreign.append(r.event_range_id)
        elif not _fits(r):
            out.errors.append(
                PilotError(
                    ErrorCode.MESSAGEHANDLINGFAILURE,
                    f"range {r.event_range_id}: numbers too big or not canonical",
                )
            )
        else:
            good.append(r)
    out.cols, out.files = columns_of(good)
    return out


_ID_SHAPE = np.frombuffer(b"----\n", np.uint8)
_POW10 = 10 ** np.arange(19, dtype=np.int64)


def _id_numbers(rids: tuple[str, ...]) -> np.ndarray | None:
    """The five numbers of each range id, parsed as bytes in a few array passes; None
    unless every id is ``digits-digits-digits-digits-digits`` (ASCII, at most 18 each)."""
    n = len(rids)
    try:
        b = np.frombuffer(("\n".join(rids) + "\n").encode("ascii"), np.uint8)
    except UnicodeEncodeError:
        return None
    if len(b) % n == 0:
        aligned = _aligned_numbers(b.reshape(n, len(b) // n))
        if aligned is not None:
            return aligned
    sep = (b == 45) | (b == 10)  # "-" and "\n"
    at = np.flatnonzero(sep)
    if len(at) != 5 * n or not (b[at].reshape(n, 5) == _ID_SHAPE).all():
        return None
    first = np.empty(len(at), dtype=np.int64)
    first[0], first[1:] = 0, at[:-1] + 1
    width = at - first
    if (width < 1).any() or (width > 18).any():  # empty, or may not fit in 63 bits
        return None
    if ((b[first] == 48) & (width > 1)).any():  # "007": the ledger would give back "7"
        return None
    pos = np.flatnonzero(~sep)
    digit = b[pos].astype(np.int64) - 48
    if ((digit < 0) | (digit > 9)).any():
        return None
    token = np.repeat(np.arange(len(at)), width)  # the number each digit belongs to
    weight = _POW10[at[token] - pos - 1]
    offsets = np.empty(len(at), dtype=np.int64)
    offsets[0], offsets[1:] = 0, np.cumsum(width)[:-1]
    return np.add.reduceat(digit * weight, offsets).reshape(n, 5)


def _aligned_numbers(m: np.ndarray) -> np.ndarray | None:
    """The common batch: ids of one job whose numbers have as many digits each, so
    that the ids are the rows of a byte matrix with dashes in the same columns. Each
    number is then a column slice times powers of ten. None if the batch is not so."""
    width = m.shape[1] - 1
    if not (m[:, width] == 10).all():  # then no row holds a newline: all are `width` long
        return None
    dashes = np.flatnonzero(m[0, :width] == 45)
    if len(dashes) != 4 or not (m[:, dashes] == 45).all():
        return None
    bounds = [0, *(dashes + 1).tolist()]
    ends = [*dashes.tolist(), width]
    out = np.empty((len(m), 5), dtype=np.int64)
    for k, (a, e) in enumerate(zip(bounds, ends)):
        digits = m[:, a:e] - np.uint8(48)  # wraps below "0": one test for both ends
        if not 1 <= e - a <= 18 or (digits > 9).any():
            return None
        if e - a > 1 and (digits[:, 0] == 0).any():  # "007": refused on the slow path
            return None
        out[:, k] = digits.astype(np.int64) @ _POW10[e - a - 1 :: -1]
    return out


def _bulk(items: list[Any], panda_id: int) -> Intake | None:
    """The whole batch at once, or None if anything needs a closer look."""
    if set(map(type, items)) != {dict}:
        return None
    try:  # itemgetter: one C call per range for the keys every range has
        rids, starts, lasts, lfns, guids, scopes = zip(*map(_FIELDS, items))
    except KeyError:
        return None
    pfns = list(map(dict.get, items, repeat("PFN")))
    if set(map(type, rids)) != {str} or set(map(type, starts)) | set(map(type, lasts)) != {int}:
        return None
    n = len(items)
    nums = _id_numbers(rids)
    if nums is None:
        return None
    try:
        start = np.array(starts, dtype=np.int64)
        last = np.array(lasts, dtype=np.int64)
    except OverflowError:
        return None
    if (
        (start < 0).any()
        or (last < start).any()
        or (last - start >= _NEV_MAX).any()
        or (nums[:, 3] > _PROC_MAX).any()
        or (nums[:, 4] > _ATTEMPT_MAX).any()
    ):
        return None
    raw: list[tuple[Any, ...]] = []
    try:
        if all(col.count(col[0]) == n for col in (lfns, guids, scopes, pfns)):
            # one input file, the common case: no tuple per range (the one file's
            # values are checked below, and a non-string never equals a string)
            distinct = {(lfns[0], guids[0], scopes[0], pfns[0]): None}
        else:
            raw = list(zip(lfns, guids, scopes, pfns))
            distinct = dict.fromkeys(raw)
    except TypeError:  # an unhashable value: not a plain string
        return None
    files: list[tuple[str, ...]] = []
    for i, key in enumerate(distinct):
        lfn, guid, scope, pfn = key
        norm = (_text(guid), _text(scope), _text(pfn))
        if not _plain_lfn(lfn) or None in norm:
            return None
        files.append((lfn, *norm))  # type: ignore[arg-type]
        distinct[key] = i
    mine = nums[:, 1] == panda_id
    cols = np.zeros(n, dtype=ADD_DTYPE)
    cols["file_id"] = nums[:, 2]
    cols["proc"] = nums[:, 3]
    cols["attempt"] = nums[:, 4]
    cols["start"] = start
    cols["last"] = last
    if len(distinct) > 1:  # else all zero: one input file, the common case
        cols["fref"] = [distinct[f] for f in raw]
    foreign = [rids[i] for i in np.flatnonzero(~mine).tolist()]
    return Intake(cols[mine] if foreign else cols, files, foreign=foreign)
