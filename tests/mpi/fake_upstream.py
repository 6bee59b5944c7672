"""An in-memory upstream for tests of the Yoda loop (not a mock of PanDA's wire format:
the HTTP path is tested against the embedded dispatcher)."""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

from pilot.errors import ErrorCode, PilotError


def make_ranges(task: int, panda: int, n: int, lfn: str = "EVNT.pool.root") -> list[dict]:
    return [
        {
            "eventRangeID": f"{task}-{panda}-9000-{i + 1}-1",
            "startEvent": i * 5,
            "lastEvent": i * 5 + 4,
            "LFN": lfn,
            "GUID": "GUID-1",
            "scope": "mc",
        }
        for i in range(n)
    ]


class MemoryUpstream:
    """Hands out ranges per job and records every update, so invariants can be checked."""

    def __init__(self, jobs: dict[int, list[dict]]) -> None:
        self.ranges = {pid: list(rs) for pid, rs in jobs.items()}
        self.dispatched: list[str] = []
        self.updates: list[dict[str, Any]] = []
        self.down = False
        self.calls = Counter()
        self._lock = threading.Lock()

    def get_event_ranges(self, panda_id, jobset_id, task_id, n_ranges):
        with self._lock:
            self.calls["get"] += 1
            if self.down:
                raise PilotError(ErrorCode.COMMUNICATIONFAILURE, "upstream down")
            left = self.ranges.get(panda_id, [])
            out, self.ranges[panda_id] = left[:n_ranges], left[n_ranges:]
            self.dispatched.extend(r["eventRangeID"] for r in out)
            return out

    def update_event_ranges(self, entries, version=0):
        with self._lock:
            self.calls["update"] += 1
            if self.down:
                raise PilotError(ErrorCode.COMMUNICATIONFAILURE, "upstream down")
            self.updates.extend(entries)
            return [True] * len(entries)
