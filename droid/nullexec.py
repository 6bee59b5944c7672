"""A payload that costs nothing: it finishes each range at once (or after ``delay``).

Used by the throughput benchmark (the rate through rank 0 with no payload
cost, so that only Yoda, Droid and MPI are measured) and by tests of the
Droid/Yoda logic that must not depend on a payload's timing. With
``write_outputs`` it writes a small output per range, renamed into place
only when complete and checksummed like a real one, so the invariant checker
can verify it.

It works on column batches throughout (see :mod:`droid.executors`): without
outputs to write, no object is made per range.
"""

from __future__ import annotations

import os
import time
import zlib
from collections import deque
from pathlib import Path

import numpy as np

from hpc.wire import FINISHED, RESULT_DTYPE, ResultBatch, WorkBatch
from pilot.job import Job


class NullExecutor:
    """The :class:`droid.executors.Executor` interface; ``slots`` ranges run at once."""

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
        self._queue: deque[WorkBatch] = deque()
        self._running: list[tuple[WorkBatch, float]] = []
        self._n_queued = 0
        self._n_running = 0
        self._no_more = False
        self._stopped = False

    def start(self) -> None:
        if self.write_outputs:
            (self.workdir / "outputs").mkdir(parents=True, exist_ok=True)

    def add(self, work: WorkBatch) -> None:
        if len(work):
            self._queue.append(work)
            self._n_queued += len(work)
            self._start_some()

    def _start_some(self) -> None:
        now = time.monotonic()
        while self._queue and self._n_running < self.slots:
            work = self._queue.popleft()
            free = self.slots - self._n_running
            if len(work) > free:
                self._queue.appendleft(work.select(slice(free, None)))
                work = work.select(slice(free))
            self._running.append((work, now))
            self._n_queued -= len(work)
            self._n_running += len(work)

    def no_more_ranges(self) -> None:
        self._no_more = True

    def wanted(self) -> int:
        if self._no_more or self._stopped:
            return 0
        return max(0, self.slots - self._n_queued - self._n_running)

    def in_flight(self) -> list[int]:
        return [row for work, _ in self._running for row in work.cols["row"].tolist()]

    @property
    def finished(self) -> bool:
        return self._no_more and not self._queue and not self._running

    def _outputs(self, work: WorkBatch, cols: np.ndarray) -> tuple[list[str], list[str]]:
        paths, adlers = [], []
        for i, (_, _, _, r) in enumerate(work.ranges()):
            data = f"{r.event_range_id} {r.start_event} {r.last_event}\n".encode()
            final = self.workdir / "outputs" / f"{r.event_range_id}.out"
            tmp = final.with_name(f".{final.name}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, final)
            paths.append(str(final))
            adlers.append(f"{zlib.adler32(data) & 0xFFFFFFFF:08x}")
            cols["fsize"][i] = len(data)
        return paths, adlers

    def poll(self, timeout: float) -> ResultBatch:
        now = time.monotonic()
        ready = [(w, t) for w, t in self._running if now - t >= self.delay]
        if not ready:
            if self._running:
                soonest = min(t for _, t in self._running) + self.delay - now
                time.sleep(max(0.0, min(timeout, soonest)))
            else:
                time.sleep(max(0.0, timeout))
            return ResultBatch.empty()
        self._running = [(w, t) for w, t in self._running if now - t < self.delay]
        out = []
        for work, _ in ready:
            n = len(work)
            cols = np.zeros(n, dtype=RESULT_DTYPE)
            cols["row"], cols["key"], cols["state"] = work.cols["row"], work.cols["key"], FINISHED
            if self.write_outputs:
                paths, adlers = self._outputs(work, cols)
            else:
                paths, adlers = [""] * n, [""] * n
            out.append(ResultBatch(cols, paths, adlers, [""] * n))
            self._n_running -= n
        self._start_some()
        return ResultBatch.concat(out)

    def stop(self, grace: float) -> list[int]:
        self._stopped = True
        left = self.in_flight() + [r for w in self._queue for r in w.cols["row"].tolist()]
        self._running.clear()
        self._queue.clear()
        self._n_running = self._n_queued = 0
        return left
