"""What every event-service executor keeps: the ranges it holds and what came of them.

:class:`HeldRanges` is the bookkeeping the two executors share (the
AthenaMP-protocol one in :mod:`pilot.eventservice.executor`, the one-process-
per-range one in :mod:`pilot.eventservice.command`): ranges queued, handed to
the payload, reported; results with their outputs collected and checksummed.
Both import it, neither imports the other's module for it.
"""

from __future__ import annotations

import logging
import shlex
from collections import deque
from pathlib import Path

from pilot.errors import ErrorCode, PayloadDiagnosis, PilotError, error_diag
from pilot.eventservice.model import RangeResult, RangeStatus
from pilot.eventservice.outputs import collect_output
from pilot.job import EventRange, Job
from pilot.payload.container import ContainerSpec
from pilot.payload.guard import Guard
from pilot.payload.runner import PayloadProcess

log = logging.getLogger(__name__)

PLACEHOLDERS = ("{eventRangeID}", "{startEvent}", "{lastEvent}", "{LFN}", "{GUID}", "{outputFile}")
# Defaults of the payload's bounds: AthenaMP may initialise for many minutes, and
# PanDA Pilot 3 waits 30 minutes for the last reports after "No more events".
READY_TIMEOUT = 1800.0
FINAL_WAIT = 1800.0


def payload_command(job: Job) -> str:
    return f"{job.transformation} {job.job_pars}".strip()


def resolve_mode(job: Job, mode: str | None = None) -> str:
    """``protocol`` or ``command``: explicit, or ``command`` when the job's command has placeholders."""
    if mode is not None:
        if mode not in ("protocol", "command"):
            raise PilotError(ErrorCode.NOTDEFINED, f"unknown event-service mode {mode!r}")
        return mode
    text = payload_command(job)
    return "command" if any(p in text for p in PLACEHOLDERS) else "protocol"


def split_command(text: str) -> list[str]:
    try:
        argv = shlex.split(text)
    except ValueError as exc:
        raise PilotError(
            ErrorCode.PAYLOADEXECUTIONEXCEPTION, f"cannot parse payload command: {exc}"
        ) from None
    if not argv:
        raise PilotError(ErrorCode.NOTDEFINED, "empty payload command")
    return argv


class HeldRanges:
    """Ranges in, results out: the state both executors keep, and its rules."""

    def __init__(
        self,
        job: Job,
        workdir: Path,
        *,
        env: dict | None = None,
        max_restarts: int = 3,
        output_dir: Path | None = None,
        mode: str | None = None,
        range_timeout: float | None = None,
        prefetch: int | None = None,
        command: list[str] | None = None,
        ready_timeout: float | None = READY_TIMEOUT,
        final_wait: float | None = FINAL_WAIT,
        container: ContainerSpec | None = None,
        guard: Guard | None = None,
    ) -> None:
        self.job = job
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.env = dict(env) if env is not None else None
        self.max_restarts = max_restarts
        self.output_dir = Path(output_dir).resolve() if output_dir else self.workdir / "es_outputs"
        self.mode = resolve_mode(job, mode)
        self.range_timeout = range_timeout
        self.prefetch = prefetch if prefetch is not None else max(2, 2 * job.core_count)
        self.command = command
        self.ready_timeout = ready_timeout
        self.final_wait = final_wait
        self.container = container
        # The job's guard rails (limits, connection policy, the kill of the whole tree):
        # without one, only the tree's kill and the orphans' end.
        self.guard = guard or Guard.bare(job, self.workdir)
        self.payload: PayloadProcess | None = None
        self.restarts = 0
        self.error: PilotError | None = None  # set when the payload cannot go on
        self.exit_diagnosis: PayloadDiagnosis | None = None  # of the payload's last exit
        self.bad_messages = 0  # messages refused or dropped, for the job's record
        self.payload_command = ""  # the last command started, channel name written in
        self._queue: deque[EventRange] = deque()
        self._in_flight: dict[str, tuple[EventRange, float]] = {}
        self._known: set[str] = set()
        self._reported: set[str] = set()
        self._no_more = False
        self._stopped = False
        self._exited = False
        self._pending: list[RangeResult] = []

    # -- shared bookkeeping --------------------------------------------------
    def _dispatch(self) -> None:
        """Hand queued ranges to a payload that waits for one (the protocol executor)."""

    def add_ranges(self, ranges: list[EventRange]) -> None:
        for r in ranges:
            if r.event_range_id in self._known:
                log.warning("range %s given twice: ignored", r.event_range_id)
                continue
            self._known.add(r.event_range_id)
            self._queue.append(r)
        self._dispatch()

    def no_more_ranges(self) -> None:
        self._no_more = True
        self._dispatch()

    def wanted(self) -> int:
        if self._no_more or self._stopped or self.error is not None:
            return 0
        return max(0, self.prefetch - len(self._queue) - len(self._in_flight))

    def in_flight(self) -> list[str]:
        return list(self._in_flight)

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def finished(self) -> bool:
        return self._exited and self._no_more and not self._queue and not self._in_flight

    def _result(self, result: RangeResult) -> None:
        self._in_flight.pop(result.event_range_id, None)
        self._reported.add(result.event_range_id)
        self._pending.append(result)

    def _fail(self, rid: str, status: RangeStatus, code: int, detail: str) -> None:
        self._result(
            RangeResult(rid, status, error_code=int(code), error_diag=error_diag(code, detail))
        )

    def _done(self, rid: str, paths: list[str], cpu: float, wall: float) -> None:
        try:
            out = collect_output(paths, rid, self.workdir, self.output_dir)
        except PilotError as exc:
            log.warning("range %s: output not usable: %s", rid, exc)
            self._fail(rid, RangeStatus.FAILED, exc.code, exc.detail)
            return
        self._result(
            RangeResult(rid, RangeStatus.FINISHED, str(out.path), out.fsize, out.adler32, cpu, wall)
        )

    def _unexpected(self, rid: str, what: str) -> bool:
        """True (and logged) when ``rid`` is not a range the payload is working on."""
        if rid in self._in_flight:
            return False
        self.bad_messages += 1
        if rid in self._reported:
            log.warning("payload reported range %s again (%s): dropped", rid, what)
        else:
            log.warning("payload reported unknown range %r (%s): dropped", rid, what)
        return True

    def _take_results(self) -> list[RangeResult]:
        out, self._pending = self._pending, []
        return out
