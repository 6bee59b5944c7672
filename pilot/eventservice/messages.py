"""Messages an event-service payload sends, parsed into typed records.

The formats are AthenaMP's (see DESIGN.md): ``Ready for events``; a done
range ``<output paths>,ID:<eventRangeID>,CPU:<s>,WALL:<s>`` where the output
part may list several comma-separated paths; an error
``ERR_<ACRONYM> <eventRangeID>: <diagnostic>``.

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

import re
from dataclasses import dataclass, field
from typing import Union

from pilot.errors import ErrorCode
from pilot.eventservice.model import RangeStatus

READY = "Ready for events"
NO_MORE = "No more events"

FATAL_ACRONYMS = frozenset({"ERR_TE_FATAL", "ERR_ATHENAMP_PARSE", "ERR_ES_FATAL"})

_ERR = re.compile(r"^(ERR_[A-Z0-9_]+)\s+([^\s:]*)\s*:?\s*(.*)$", re.S)
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
