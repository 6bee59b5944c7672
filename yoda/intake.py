"""Ranges from the upstream, validated in bulk into ledger columns.

``getEventRanges`` answers with a JSON list of dicts, one per range. Rank 0
turns each batch into :data:`yoda.journal.ADD_DTYPE` columns without making
an object per range: the ids are checked by one regular expression over the
joined batch and split into numbers in one pass, the integers are checked as
arrays, and the file names (a handful per batch) are validated once each.

Anything unusual in a batch sends that batch down the slow path instead,
:func:`parse_ranges`, which judges range by range exactly as
:meth:`EventRange.from_panda` does and names what is wrong. Both paths accept
the same ranges (``tests/unit/test_yoda_parse.py``).
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pilot.errors import ErrorCode, PilotError
from pilot.job import MAX_LFN, EventRange
from yoda.journal import ADD_DTYPE, add_columns

_ID = r"[0-9]+-[0-9]+-[0-9]+-[0-9]+-[0-9]+"
_RANGE_ID = re.compile(_ID)
_RANGE_IDS = re.compile(rf"{_ID}(?:\n{_ID})*")
_NULLS = frozenset({"", "NULL", "None", "null"})
_NUMBERS = operator.itemgetter("eventRangeID", "startEvent", "lastEvent")
_FILE = operator.itemgetter("LFN", "GUID", "scope")
# the ledger's column widths: proc u32, attempt u16, events per range u32
_PROC_MAX, _ATTEMPT_MAX, _NEV_MAX = 2**32 - 1, 2**16 - 1, 2**32 - 1


def _text(value: Any) -> str | None:
    if value is None:
        return ""
    if type(value) is not str:
        return None
    return "" if value.strip() in _NULLS else value


def _plain_lfn(lfn: Any) -> bool:
    return (
        type(lfn) is str
        and 0 < len(lfn) <= MAX_LFN
        and lfn.isprintable()
        and lfn.strip() not in _NULLS
        and lfn not in (".", "..")
        and not lfn.startswith("..")
        and "/" not in lfn
        and "\\" not in lfn
    )


def parse_ranges(items: list[Any]) -> list[EventRange | PilotError]:
    """Validate upstream ranges one by one: the plain common case checked inline,
    anything unusual through :meth:`EventRange.from_panda` (its diagnostics)."""
    out: list[EventRange | PilotError] = []
    for d in items:
        if type(d) is dict:
            rid, start, last = d.get("eventRangeID"), d.get("startEvent"), d.get("lastEvent")
            lfn = d.get("LFN")
            guid, scope, pfn = _text(d.get("GUID")), _text(d.get("scope")), _text(d.get("PFN"))
            if (
                type(rid) is str
                and _RANGE_ID.fullmatch(rid)
                and type(start) is int
                and type(last) is int
                and 0 <= start <= last
                and _plain_lfn(lfn)
                and guid is not None
                and scope is not None
                and pfn is not None
            ):
                out.append(EventRange(rid, start, last, lfn, guid, scope, pfn))
                continue
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
    _, _, file_id, proc, attempt = (int(p) for p in r.event_range_id.split("-"))
    return (
        file_id < 2**63
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
                PilotError(ErrorCode.MESSAGEHANDLINGFAILURE, f"range {r.event_range_id}: too big")
            )
        else:
            good.append(r)
    out.cols, out.files = add_columns(good)
    return out


def _bulk(items: list[Any], panda_id: int) -> Intake | None:
    """The whole batch at once, or None if anything needs a closer look."""
    if not all(type(d) is dict for d in items):
        return None
    try:  # itemgetter: one C call per range for the keys every range has
        rids, starts, lasts = zip(*map(_NUMBERS, items))
        raw = list(zip(map(_FILE, items), [d.get("PFN") for d in items]))
    except KeyError:
        return None
    if set(map(type, rids)) != {str} or set(map(type, starts)) | set(map(type, lasts)) != {int}:
        return None
    joined = "\n".join(rids)
    if not _RANGE_IDS.fullmatch(joined):
        return None
    n = len(items)
    try:
        nums = np.fromiter(map(int, joined.replace("\n", "-").split("-")), np.int64, 5 * n)
        start = np.array(starts, dtype=np.int64)
        last = np.array(lasts, dtype=np.int64)
    except (OverflowError, ValueError):
        return None
    nums = nums.reshape(n, 5)
    if (
        (start < 0).any()
        or (last < start).any()
        or (last - start >= _NEV_MAX).any()
        or (nums[:, 3] > _PROC_MAX).any()
        or (nums[:, 4] > _ATTEMPT_MAX).any()
    ):
        return None
    try:
        distinct = dict.fromkeys(raw)
    except TypeError:  # an unhashable value: not a plain string
        return None
    files: list[tuple[str, ...]] = []
    for i, key in enumerate(distinct):
        (lfn, guid, scope), pfn = key
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
    cols["fref"] = [distinct[f] for f in raw]
    foreign = [rids[i] for i in np.flatnonzero(~mine).tolist()]
    return Intake(cols[mine] if foreign else cols, files, foreign=foreign)
