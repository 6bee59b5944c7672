"""Event-service records shared by the single-node pilot, Droids and Yoda.

A :class:`RangeResult` is what one event range came to. It is produced by the
payload feeder, carried over MPI by Droids, journaled by Yoda, and finally
turned into PanDA's ``updateEventRanges`` entry or Harvester's
``event_status.dump.json`` entry. One record type on the whole path keeps
the formats from drifting apart.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any


class RangeStatus(str, Enum):
    """Terminal statuses PanDA accepts for a range (``eventStatus``)."""

    FINISHED = "finished"
    FAILED = "failed"
    FATAL = "fatal"


@dataclass
class RangeResult:
    """What one event range came to.

    ``output_path`` is the range's output after it was renamed into place;
    ``adler32``/``fsize`` describe that file. ``error_code`` is a PanDA
    pilot error code (e.g. 1224 ESRECOVERABLE, 1228 ESFATAL) when the range
    did not finish.
    """

    event_range_id: str
    status: RangeStatus
    output_path: str = ""
    fsize: int = 0
    adler32: str = ""
    cpu: float = 0.0
    wall: float = 0.0
    error_code: int = 0
    error_diag: str = ""

    @property
    def panda_id(self) -> int:
        return int(self.event_range_id.split("-")[1])

    def to_panda_v0(self) -> dict[str, Any]:
        """Entry of ``updateEventRanges`` (version 0)."""
        d: dict[str, Any] = {"eventRangeID": self.event_range_id, "eventStatus": self.status.value}
        if self.status is not RangeStatus.FINISHED:
            d["errorCode"] = self.error_code
            d["errorDiag"] = self.error_diag[:256]
        if self.cpu:
            d["cpuConsumptionTime"] = round(self.cpu, 3)
        return d

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["status"] = self.status.value
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RangeResult:
        d = dict(d)
        d["status"] = RangeStatus(d["status"])
        return cls(**d)
