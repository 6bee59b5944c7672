"""What a Droid runs its ranges with: executors that take and give back column batches.

A Droid hands an executor a :class:`hpc.wire.WorkBatch` and gets back a
:class:`hpc.wire.ResultBatch` whose rows and keys are already filled in, so
nothing between Yoda's WORK and the Droid's UPDATE needs an object per range
unless the payload itself does. The shared event-service executor
(:class:`pilot.eventservice.executor.EventExecutor`) speaks in ranges, one
:class:`EventRange` in, one :class:`RangeResult` out; :class:`PerRange` puts it
behind the batch interface and keeps the range id -> ledger row map that this
needs. :class:`droid.nullexec.NullExecutor` is batch-native.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from hpc.wire import ResultBatch, WorkBatch
from pilot.eventservice.model import RangeResult
from pilot.eventservice.stageout import stored
from pilot.job import EventRange, Job
from pilot.payload.runner import end_leftovers

log = logging.getLogger(__name__)


class Executor(Protocol):
    """What the Droid needs of an executor. Rows are the ledger rows of the ranges."""

    error: Any  # not None once the payload gave up for good

    def start(self) -> None: ...
    def add(self, work: WorkBatch) -> None: ...
    def no_more_ranges(self) -> None: ...
    def wanted(self) -> int: ...
    def poll(self, timeout: float) -> ResultBatch: ...
    def in_flight(self) -> Sequence[int]: ...
    def stop(self, grace: float) -> list[int]: ...

    @property
    def finished(self) -> bool: ...


ExecutorFactory = Callable[[Job, Path, int, float], Executor]


class RangeExecutor(Protocol):
    """The per-range interface of :class:`pilot.eventservice.executor.EventExecutor`."""

    def start(self) -> None: ...
    def add_ranges(self, ranges: list[EventRange]) -> None: ...
    def no_more_ranges(self) -> None: ...
    def wanted(self) -> int: ...
    def poll(self, timeout: float) -> list[RangeResult]: ...
    def in_flight(self) -> list[str]: ...
    def stop(self, grace: float) -> list[EventRange]: ...

    @property
    def finished(self) -> bool: ...


class PerRange:
    """A per-range executor behind the batch interface. With ``stage_out``, a finished
    range's output is stored before its result is handed over, as in the single-node
    event service (:func:`pilot.eventservice.stageout.stored`)."""

    def __init__(
        self,
        inner: RangeExecutor,
        stage_out: Callable[[RangeResult], RangeResult] | None = None,
    ) -> None:
        self.inner = inner
        self.stage_out = stage_out
        self._held: dict[str, tuple[int, int]] = {}  # range id -> (row, key)

    @property
    def error(self) -> Any:
        return getattr(self.inner, "error", None)

    @property
    def finished(self) -> bool:
        return self.inner.finished

    def start(self) -> None:
        self.inner.start()

    def add(self, work: WorkBatch) -> None:
        ranges = []
        for row, key, _, r in work.ranges():
            self._held[r.event_range_id] = (row, key)
            ranges.append(r)
        self.inner.add_ranges(ranges)

    def no_more_ranges(self) -> None:
        self.inner.no_more_ranges()

    def wanted(self) -> int:
        return self.inner.wanted()

    def poll(self, timeout: float) -> ResultBatch:
        items = []
        for res in self.inner.poll(timeout):
            held = self._held.pop(res.event_range_id, None)
            if held is None:
                log.warning("result for unknown range %s dropped", res.event_range_id)
                continue
            if self.stage_out is not None:
                res = stored(res, self.stage_out)
            items.append((*held, res))
        return ResultBatch.from_results(items)

    def in_flight(self) -> list[int]:
        return [self._held[rid][0] for rid in self.inner.in_flight() if rid in self._held]

    def stop(self, grace: float) -> list[int]:
        left = self.inner.stop(grace)
        return [self._held.pop(r.event_range_id)[0] for r in left if r.event_range_id in self._held]

    def metrics(self) -> dict[str, Any]:
        """The job's memory and I/O fields here, with the samples they stand on (the
        weight rank 0 gives them beside other droids'); empty when nothing watched it."""
        guard = getattr(self.inner, "guard", None)
        if guard is None:
            return {}
        summary, samples = guard.weighed()
        return {"fields": summary, "samples": samples} if summary else {}


def event_executor(
    job: Job,
    workdir: Path,
    slots: int,
    lease_s: float,
    *,
    storage: Any = None,
    config: Any = None,
    started: float | None = None,
) -> Executor:
    """The real executor: the shared event-service code, outputs under ``workdir``.

    ``config`` (a :class:`pilot.config.PilotConfig`: the queue's description,
    ``monitor_interval``, ``connection_policy``, ``kill_grace``, ``container``)
    sets the guard rails as in ``pilot run`` (:class:`pilot.payload.guard.Guard`):
    the payload runs in the job's container with the pilot's credentials removed,
    under the monitor with the job's limits (maxRSS, walltime, looping, disk,
    stdout) and the connection policy; a breach kills its whole tree and fails the
    ranges it held with the breach's code. Without one, the job's own limits and
    the defaults apply. ``storage`` (``copytool``, ``copytool_options``,
    ``output_url``, ``workdir``, ``stageout_timeout``, as in the pilot's config)
    stores each finished range's output the way ``pilot run`` does
    (:func:`range_stage_out`); Harvester's copytool leaves it where it is."""
    from pilot.config import PilotConfig
    from pilot.eventservice.executor import EventExecutor
    from pilot.eventservice.stageout import range_stage_out
    from pilot.payload.guard import Guard

    Path(workdir).mkdir(parents=True, exist_ok=True)
    left = end_leftovers(workdir)  # a payload a killed droid of an earlier run left here
    if left:
        log.warning("ended payload processes an earlier droid left in %s: %s", workdir, left)
    guard = Guard(job, workdir, config if config is not None else PilotConfig(), started=started)
    inner = EventExecutor(
        job,
        workdir,
        env=guard.environment(),
        max_restarts=3,
        output_dir=workdir / "outputs",
        range_timeout=lease_s,
        prefetch=max(1, slots),
        container=guard.container,
        guard=guard,
    )
    return PerRange(inner, range_stage_out(job, storage) if storage is not None else None)
