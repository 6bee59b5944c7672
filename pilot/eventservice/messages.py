"""Messages an event-service payload sends, parsed into typed records, and the
one message the pilot builds for it: a range.

The formats are AthenaMP's (docs/DESIGN.md, "Event-service transport"):
``Ready for events``; a done range
``<output paths>,ID:<eventRangeID>,CPU:<s>,WALL:<s>`` where the output part
may list several comma-separated paths and AthenaMT sends ``N/A`` for the
times; an error ``ERR_<ACRONYM> <eventRangeID>: <diagnostic>``, except
``ERR_ATHENAMP_PARSE "<range text>": <reason>``, which quotes the range it
could not read: its ID is looked for inside that text.

ERR_ mapping (the status PanDA is told and the code it gets):

=====================  ========  =====================
acronym                status    errorCode
=====================  ========  =====================
``ERR_TE_FATAL``       fatal     1228 ESFATAL
``ERR_ATHENAMP_PARSE`` fatal     1228 ESFATAL
``ERR_ES_FATAL``       fatal     1228 ESFATAL
any other ``ERR_*``    failed    1224 ESRECOVERABLE
=====================  ========  =====================

A parse error or a fatal transform error will not go away on a retry, so
PanDA is told not to retry the range; everything else may work elsewhere.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Union

from pilot.errors import ErrorCode, PilotError
from pilot.eventservice.model import RangeStatus
from pilot.job import EventRange

READY = "Ready for events"
NO_MORE = "No more events"

FATAL_ACRONYMS = frozenset({"ERR_TE_FATAL", "ERR_ATHENAMP_PARSE", "ERR_ES_FATAL"})

_ERR = re.compile(r"^(ERR_[A-Z0-9_]+)\s+([^\s:]*)\s*:?\s*(.*)$", re.S)
# ERR_ATHENAMP_PARSE "<range text>": <reason>; the text is the range as the
# payload saw it, in whatever quoting its parser left (u'...', "...", bare).
_PARSE = re.compile(r'^ERR_ATHENAMP_PARSE\s+"(.*)"\s*:\s*(.*)$', re.S)
_PARSE_ID = re.compile(r"""eventRangeID['"]?\s*:\s*u?['"]?\s*([0-9A-Za-z._-]+)""")
_DONE = re.compile(r"^(?P<paths>.*?),ID:(?P<id>[^,]+),CPU:(?P<cpu>[^,]*),WALL:(?P<wall>[^,]*)$")


@dataclass(frozen=True)
class ReadyMessage:
    pass


@dataclass(frozen=True)
class DoneMessage:
    event_range_id: str
    paths: list[str] = field(default_factory=list)
    cpu: float = 0.0
    wall: float = 0.0


@dataclass(frozen=True)
class ErrorMessage:
    acronym: str
    event_range_id: str
    diag: str

    @property
    def status(self) -> RangeStatus:
        return RangeStatus.FATAL if self.acronym in FATAL_ACRONYMS else RangeStatus.FAILED

    @property
    def code(self) -> int:
        return int(
            ErrorCode.ESFATAL if self.status is RangeStatus.FATAL else ErrorCode.ESRECOVERABLE
        )


@dataclass(frozen=True)
class BadMessage:
    text: str
    reason: str


PayloadMessage = Union[ReadyMessage, DoneMessage, ErrorMessage, BadMessage]


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        return 0.0
    return value if value >= 0 and value == value else 0.0


def parse_message(text: str) -> PayloadMessage:
    """Classify one line from the payload; anything unrecognised is a BadMessage."""
    text = text.strip()
    if text == READY:
        return ReadyMessage()
    if text.startswith("ERR_ATHENAMP_PARSE"):
        return _parse_error(text)
    if text.startswith("ERR_"):
        m = _ERR.match(text)
        if not m:
            return BadMessage(text, "error message without a range id")
        return ErrorMessage(m.group(1), m.group(2), m.group(3).strip())
    m = _DONE.match(text)
    if m:
        paths = [p.strip() for p in m.group("paths").split(",") if p.strip()]
        if not paths:
            return BadMessage(text, "done message without an output path")
        return DoneMessage(
            m.group("id").strip(), paths, _seconds(m.group("cpu")), _seconds(m.group("wall"))
        )
    return BadMessage(text, "not a protocol message")


def _parse_error(text: str) -> PayloadMessage:
    m = _PARSE.match(text)
    quoted, reason = (m.group(1), m.group(2).strip()) if m else (text, "")
    found = _PARSE_ID.search(quoted)
    if found is None:
        # Old-style "ERR_ATHENAMP_PARSE <id>: ..." is still an ID after the acronym.
        plain = _ERR.match(text)
        if m is None and plain and plain.group(2) and not plain.group(2).startswith('"'):
            return ErrorMessage("ERR_ATHENAMP_PARSE", plain.group(2), plain.group(3).strip())
        return BadMessage(text, "parse error that names no eventRangeID")
    diag = f"{reason or 'cannot parse'}: {quoted}" if quoted else reason
    return ErrorMessage("ERR_ATHENAMP_PARSE", found.group(1), diag.strip())


# Characters that AthenaMP's range parser cannot carry in a value: it splits the
# text on commas, cuts each pair at the first colon and trims spaces, quotes and
# a u' prefix; JSON would escape a quote, a backslash or a control character
# into text that parser keeps literally.
_UNSAFE = re.compile(r'[,"\\\x00-\x1f\x7f]')


def range_message(r: EventRange, pfn: str) -> str:
    """The one-range message for the payload: ``json.dumps([range])``.

    ``PFN`` is always set (AthenaMT requires it). A value the payload's parser
    would split or mangle raises a PilotError (1224 ESRECOVERABLE): the range is
    failed with a clear reason instead of being sent broken.
    """
    fields: dict[str, object] = {
        "eventRangeID": r.event_range_id,
        "startEvent": r.start_event,
        "lastEvent": r.last_event,
        "LFN": r.lfn,
        "GUID": r.guid,
        "PFN": pfn,
        "scope": r.scope,
    }
    for key, value in fields.items():
        if isinstance(value, str) and (_UNSAFE.search(value) or value != value.strip()):
            raise PilotError(
                ErrorCode.ESRECOVERABLE,
                f"range {r.event_range_id}: {key} {value!r} cannot be sent to the payload "
                "(AthenaMP's range parser splits on commas and keeps no quotes or escapes)",
            )
    if not pfn:
        raise PilotError(ErrorCode.ESRECOVERABLE, f"range {r.event_range_id}: no PFN to send")
    return json.dumps([fields], ensure_ascii=False)
