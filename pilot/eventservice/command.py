"""Per-range command mode: one payload process per event range.

For payloads that do not speak the event-service protocol. The job's
command (``transformation`` + ``jobPars``) is split into words *first* and
the placeholders are then replaced inside each word, so a GUID or LFN can
never inject shell syntax. Placeholders: ``{eventRangeID}``,
``{startEvent}``, ``{lastEvent}``, ``{LFN}``, ``{GUID}``, ``{outputFile}``
(``<workdir>/ranges/<eventRangeID>/out.<eventRangeID>``), and ``{PFN}``
(the range's PFN, or its LFN when it has none).

A range is finished when its command exits 0 and leaves its output: the
paths of a protocol done line on its stdout if it prints one (its CPU and
wall time are then taken from it too), otherwise ``{outputFile}``. A
non-zero exit fails the range; an ``ERR_`` line on stderr maps as in
protocol mode, anything else gives 1224 ESRECOVERABLE with the exit
diagnosis. Ranges run one at a time. After ``max_restarts`` + 1 failures in a
row with no success between them the command is considered broken: the
executor stops taking ranges and sets ``error``.
"""

from __future__ import annotations

import logging
import resource
import shlex
import shutil
import time
from pathlib import Path

from pilot.errors import ErrorCode, PilotError, diagnose_payload
from pilot.eventservice.held import HeldRanges, payload_command, split_command
from pilot.eventservice.messages import DoneMessage, ErrorMessage, parse_message
from pilot.eventservice.model import RangeStatus
from pilot.fileio import tail
from pilot.job import EventRange
from pilot.payload.container import wrap
from pilot.payload.runner import PayloadProcess

log = logging.getLogger(__name__)


def substitute(words: list[str], values: dict[str, str]) -> list[str]:
    out = []
    for word in words:
        for key, value in values.items():
            word = word.replace("{" + key + "}", value)
        out.append(word)
    return out


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class CommandExecutor(HeldRanges):
    """Same interface as :class:`pilot.eventservice.executor.EventExecutor`; a process per range."""

    _current: tuple[EventRange, Path, float, float] | None = None
    _failures_in_row = 0

    def start(self) -> None:
        """Check the command now, so a bad one fails at start as in protocol mode."""
        self._template()

    def _template(self) -> list[str]:
        return list(self.command) if self.command else split_command(payload_command(self.job))

    def _dispatch(self) -> None:
        pass  # ranges are started from poll(), one at a time

    def _launch_range(self, r: EventRange) -> None:
        rdir = self.workdir / "ranges" / r.event_range_id
        rdir.mkdir(parents=True, exist_ok=True)
        values = {
            "eventRangeID": r.event_range_id,
            "startEvent": str(r.start_event),
            "lastEvent": str(r.last_event),
            "LFN": r.lfn,
            "PFN": r.pfn or r.lfn,
            "GUID": r.guid,
            "outputFile": str(rdir / f"out.{r.event_range_id}"),
        }
        argv: list[str] = substitute(self._template(), values)
        self._in_flight[r.event_range_id] = (r, time.monotonic())
        cpu0 = _children_cpu()
        try:
            if self.container is not None:
                argv = wrap(shlex.join(argv), rdir, self.container)
            self.payload = PayloadProcess(
                argv, cwd=rdir, env=self.env, stdout=rdir / "stdout", stderr=rdir / "stderr"
            )
        except PilotError as exc:
            self._range_failed(r, exc.code, exc.detail)
            return
        self.guard.watch(self.payload)
        self._current = (r, rdir, time.time(), cpu0)

    def _range_failed(
        self, r: EventRange, code: int, detail: str, status=RangeStatus.FAILED
    ) -> None:
        self._fail(r.event_range_id, status, code, detail)
        self._failures_in_row += 1
        if self._failures_in_row > self.max_restarts and self.error is None:
            self.error = PilotError(
                code, f"per-range command failed {self._failures_in_row} times in a row: {detail}"
            )
            log.error("%s", self.error)

    def poll(self, timeout: float) -> list:
        deadline = time.monotonic() + max(0.0, timeout)
        while not self._pending:
            if self._current is None:
                if self._queue and self.error is None and not self._stopped:
                    self._launch_range(self._queue.popleft())
                    continue
                if not self.finished:
                    time.sleep(max(0.0, deadline - time.monotonic()))
                break
            assert self.payload is not None
            wait = min(deadline - time.monotonic(), self.guard.next_due())
            rc = self.payload.wait(timeout=max(0.0, wait))
            if rc is None:
                breach = self.guard.check()
                if breach is not None:
                    self._breached(breach)
                else:
                    self._check_hang()
            else:
                self._range_exited(rc)
            if time.monotonic() >= deadline:
                break
        return self._take_results()

    def _check_hang(self) -> None:
        assert self._current is not None and self.payload is not None
        r = self._current[0]
        started = self._in_flight[r.event_range_id][1]
        if self.range_timeout and time.monotonic() - started > self.range_timeout:
            self.payload.kill_tree(grace=5.0, reason_code=ErrorCode.LOOPINGJOB, reason="hung range")
            self.guard.ended(self.payload)
            self._current = None
            self._range_failed(
                r, ErrorCode.ESRECOVERABLE, f"no progress for {self.range_timeout:.0f} s"
            )

    def _breached(self, breach: PilotError) -> None:
        """A limit of the job's guard broken: the range's process tree is killed and the
        range fails with the breach's code; the next range runs unless no new process can
        cure it (:meth:`Guard.fatal`), and then the executor gives up with that code."""
        assert self._current is not None and self.payload is not None
        r = self._current[0]
        self.guard.kill(self.payload, breach)
        self.guard.ended(self.payload)
        self._current = None
        self._fail(r.event_range_id, RangeStatus.FAILED, breach.code, breach.detail)
        if self.guard.fatal(breach) and self.error is None:
            self.error = breach

    def _range_exited(self, rc: int) -> None:
        assert self._current is not None and self.payload is not None
        self.guard.ended(self.payload)  # what the range's process left behind goes with it
        r, rdir, t0, cpu0 = self._current
        self._current = None
        rid = r.event_range_id
        wall, cpu = time.time() - t0, max(0.0, _children_cpu() - cpu0)
        stdout, stderr = tail(rdir / "stdout", 4096), tail(rdir / "stderr", 4096)
        if rc != 0:
            err = next(
                (
                    m
                    for m in map(parse_message, reversed(stderr.splitlines()))
                    if isinstance(m, ErrorMessage)
                ),
                None,
            )
            if err is not None:
                self._range_failed(r, err.code, f"{err.acronym}: {err.diag}", err.status)
            else:
                diag = diagnose_payload(rc, stderr, stdout)
                self._range_failed(
                    r, ErrorCode.ESRECOVERABLE, f"command failed: {diag.pilot_error_diag}"
                )
            return
        paths = [str(rdir / f"out.{rid}")]
        for line in reversed(stdout.splitlines()):
            msg = parse_message(line)
            if isinstance(msg, DoneMessage) and msg.event_range_id == rid:
                paths, cpu, wall = msg.paths, msg.cpu or cpu, msg.wall or wall
                break
        self._done(rid, paths, cpu, wall)
        if self._pending and self._pending[-1].status is RangeStatus.FINISHED:
            self._failures_in_row = 0
            shutil.rmtree(rdir, ignore_errors=True)

    @property
    def finished(self) -> bool:
        return self._no_more and not self._queue and not self._in_flight and self._current is None

    def stop(self, grace: float) -> list[EventRange]:
        self._stopped = True
        if self._current is not None and self.payload is not None:
            self.payload.kill_tree(grace=grace, reason_code=ErrorCode.KILLSIGNAL, reason="stopped")
            self._current = None
        self.guard.ended(self.payload)
        released = [r for r, _ in self._in_flight.values()] + list(self._queue)
        self._in_flight.clear()
        self._queue.clear()
        return released
