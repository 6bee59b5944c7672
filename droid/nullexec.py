"""A payload that costs nothing: it finishes each range at once (or after ``delay``).

Used by the throughput benchmark (the rate through rank 0 with no payload
cost, so that only Yoda, Droid and MPI are measured) and by tests of the
Droid/Yoda logic that must not depend on a payload's timing. With
``write_outputs`` it writes a small output per range, renamed into place
only when complete and checksummed like a real one, so the invariant checker
can verify it.
"""

from __future__ import annotations

import os
import time
import zlib
from collections import deque
from pathlib import Path

from pilot.eventservice.model import RangeResult, RangeStatus
from pilot.job import EventRange, Job


class NullExecutor:
    """Same interface as :class:`pilot.eventservice.executor.EventExecutor`."""

    def __init__(
        self,
        job: Job,
        workdir: Path,
        slots: int = 1,
        *,
        delay: float = 0.0,
        write_outputs: bool = False,
    ) -> None:
        self.job = job
        self.workdir = Path(workdir)
        self.slots = max(1, slots)
        self.delay = delay
        self.write_outputs = write_outputs
        self.error = None
        self._queue: deque[EventRange] = deque()
        self._running: dict[str, tuple[EventRange, float]] = {}
        self._no_more = False
        self._stopped = False

    def start(self) -> None:
        if self.write_outputs:
            (self.workdir / "outputs").mkdir(parents=True, exist_ok=True)

    def add_ranges(self, ranges: list[EventRange]) -> None:
        self._queue.extend(ranges)
        self._start_some()

    def _start_some(self) -> None:
        now = time.monotonic()
        while self._queue and len(self._running) < self.slots:
            r = self._queue.popleft()
            self._running[r.event_range_id] = (r, now)

    def no_more_ranges(self) -> None:
        self._no_more = True

    def wanted(self) -> int:
        if self._no_more or self._stopped:
            return 0
        return max(0, self.slots - len(self._queue) - len(self._running))

    def in_flight(self) -> list[str]:
        return list(self._running)

    @property
    def finished(self) -> bool:
        return self._no_more and not self._queue and not self._running

    def _output(self, r: EventRange) -> tuple[str, int, str]:
        data = f"{r.event_range_id} {r.start_event} {r.last_event}\n".encode()
        final = self.workdir / "outputs" / f"{r.event_range_id}.out"
        tmp = final.with_name(f".{final.name}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, final)
        return str(final), len(data), f"{zlib.adler32(data) & 0xFFFFFFFF:08x}"

    def poll(self, timeout: float) -> list[RangeResult]:
        now = time.monotonic()
        ready = [r for r, t in self._running.values() if now - t >= self.delay]
        if not ready:
            if self._running:
                soonest = min(t for _, t in self._running.values()) + self.delay - now
                time.sleep(max(0.0, min(timeout, soonest)))
            else:
                time.sleep(max(0.0, timeout))
            return []
        out = []
        for r in ready:
            del self._running[r.event_range_id]
            path, size, adler = self._output(r) if self.write_outputs else ("", 0, "")
            out.append(
                RangeResult(r.event_range_id, RangeStatus.FINISHED, path, size, adler, 0.0, 0.0)
            )
        self._start_some()
        return out

    def stop(self, grace: float) -> list[EventRange]:
        self._stopped = True
        left = [r for r, _ in self._running.values()] + list(self._queue)
        self._running.clear()
        self._queue.clear()
        return left
