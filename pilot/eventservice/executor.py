"""Run one event-service payload and feed it event ranges.

:class:`EventExecutor` is driven from outside and never blocks for longer
than the ``timeout`` given to :meth:`EventExecutor.poll`: the single-node
loop (:mod:`pilot.eventservice.loop`) and an MPI Droid both call it between
their own duties. Ranges go in with :meth:`add_ranges`, results come out of
:meth:`poll` as :class:`RangeResult` with the output renamed into place and
checksummed.

Two modes, chosen by ``mode=`` or, by default, from the job's command:

* ``protocol``: the payload speaks AthenaMP's messages over a Unix socket
  (:mod:`pilot.eventservice.channel`); the payload is started once and
  restarted after a crash, at most ``max_restarts`` times.
* ``command``: the job's ``transformation``/``jobPars`` hold placeholders
  (``{eventRangeID}``, ``{startEvent}``, ``{lastEvent}``, ``{LFN}``,
  ``{GUID}``, ``{outputFile}``) and one process runs per range
  (:mod:`pilot.eventservice.command`). A command holding any placeholder
  selects this mode.

A payload that dies fails the range it was working on (1224 ESRECOVERABLE,
the diagnosis of the exit in the diagnostic); ``ERR_`` messages map as
:mod:`pilot.eventservice.messages` documents. A range with no message for
``range_timeout`` seconds counts as hung: the payload is killed, the range
failed and the payload restarted; so is a payload that has not said ``Ready
for events`` within ``ready_timeout`` seconds of its start (both off by
default: a real transform may initialise for many minutes). Messages about unknown or already reported
ranges are logged and dropped.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import time
from collections import deque
from pathlib import Path

from pilot.errors import ErrorCode, PayloadDiagnosis, PilotError, diagnose_payload, error_diag
from pilot.eventservice.channel import CHANNEL_VARIABLE, MessageChannel, socket_path_for
from pilot.eventservice.messages import (
    NO_MORE,
    BadMessage,
    DoneMessage,
    ErrorMessage,
    ReadyMessage,
    parse_message,
)
from pilot.eventservice.model import RangeResult, RangeStatus
from pilot.eventservice.outputs import collect_output
from pilot.job import EventRange, Job
from pilot.payload.runner import PayloadProcess

log = logging.getLogger(__name__)

PLACEHOLDERS = ("{eventRangeID}", "{startEvent}", "{lastEvent}", "{LFN}", "{GUID}", "{outputFile}")
# Longest a single poll() sleeps before looking at the payload process again
# (a payload that dies before connecting sends no end-of-file).
_CHECK_INTERVAL = 1.0


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


class EventExecutor:
    """One event-service payload for one job, fed ranges from outside."""

    def __new__(cls, job: Job, workdir: Path, **kwargs: object) -> EventExecutor:
        if cls is EventExecutor and resolve_mode(job, kwargs.get("mode")) == "command":  # type: ignore[arg-type]
            from pilot.eventservice.command import CommandExecutor

            return super().__new__(CommandExecutor)
        return super().__new__(cls)

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
        ready_timeout: float | None = None,
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
        self._launched_at = 0.0
        self._said_ready = False
        self.payload: PayloadProcess | None = None
        self.restarts = 0
        self.error: PilotError | None = None  # set when the payload cannot go on
        self.exit_diagnosis: PayloadDiagnosis | None = None  # of the payload's last exit
        self._queue: deque[EventRange] = deque()
        self._in_flight: dict[str, tuple[EventRange, float]] = {}
        self._known: set[str] = set()
        self._reported: set[str] = set()
        self._no_more = False
        self._stopped = False
        self._channel: MessageChannel | None = None
        self._waiting = False  # the payload said "Ready for events" and got nothing yet
        self._told_no_more = False
        self._exited = False
        self._pending: list[RangeResult] = []
        self._stderr_offset = 0
        self._pidfd: int | None = None

    # -- shared bookkeeping --------------------------------------------------
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
        if rid in self._reported:
            log.warning("payload reported range %s again (%s): dropped", rid, what)
        else:
            log.warning("payload reported unknown range %r (%s): dropped", rid, what)
        return True

    def _take_results(self) -> list[RangeResult]:
        out, self._pending = self._pending, []
        return out

    # -- protocol mode -------------------------------------------------------
    def _argv(self) -> list[str]:
        return list(self.command) if self.command else split_command(payload_command(self.job))

    def start(self) -> None:
        if self._channel is None:
            # One socket per job: several executors (one per PandaID) may share a directory.
            name = f"es-{self.job.panda_id}.sock"
            self._channel = MessageChannel(socket_path_for(self.workdir, name))
        self._launch()

    def _launch(self) -> None:
        assert self._channel is not None
        env = dict(self.env if self.env is not None else os.environ)
        env[CHANNEL_VARIABLE] = str(self._channel.path)
        self._waiting = False
        self._told_no_more = False
        self._exited = False
        self._said_ready = False
        self._launched_at = time.monotonic()
        stderr = self.workdir / "payload.stderr"
        self._stderr_offset = stderr.stat().st_size if stderr.exists() else 0
        self.payload = PayloadProcess(
            self._argv(),
            cwd=self.workdir,
            env=env,
            stdout=self.workdir / "payload.stdout",
            stderr=self.workdir / "payload.stderr",
        )
        self._close_pidfd()
        try:
            # Readable when the payload exits: a death before it connected wakes us at once.
            self._pidfd = os.pidfd_open(self.payload.pid)
        except (AttributeError, OSError):
            self._pidfd = None
        log.info(
            "event-service payload started, pid %d (restart %d)", self.payload.pid, self.restarts
        )

    def _dispatch(self) -> None:
        if not self._waiting or self._channel is None or self.mode != "protocol":
            return
        if self._queue:
            r = self._queue.popleft()
            if self._channel.send(json.dumps([r.to_panda()])):
                self._in_flight[r.event_range_id] = (r, time.monotonic())
                self._waiting = False
            else:
                self._queue.appendleft(r)
        elif self._no_more:
            if self._channel.send(NO_MORE):
                self._told_no_more = True
                self._waiting = False

    def _handle(self, text: str) -> None:
        msg = parse_message(text)
        if isinstance(msg, ReadyMessage):
            self._said_ready = True
            self._waiting = True
            self._dispatch()
        elif isinstance(msg, DoneMessage):
            if not self._unexpected(msg.event_range_id, "done"):
                self._done(msg.event_range_id, msg.paths, msg.cpu, msg.wall)
        elif isinstance(msg, ErrorMessage):
            if not self._unexpected(msg.event_range_id, msg.acronym):
                self._fail(msg.event_range_id, msg.status, msg.code, f"{msg.acronym}: {msg.diag}")
        elif isinstance(msg, BadMessage):
            log.warning("payload message dropped (%s): %r", msg.reason, msg.text[:200])

    def poll(self, timeout: float) -> list[RangeResult]:
        deadline = time.monotonic() + max(0.0, timeout)
        while not self._pending:
            if self._stopped or self._exited or self.payload is None or self._channel is None:
                if not self.finished:
                    # Nothing can happen: honour the timeout so a caller's loop does not spin.
                    time.sleep(max(0.0, deadline - time.monotonic()))
                break
            wait = min(_CHECK_INTERVAL, deadline - time.monotonic())
            also = (self._pidfd,) if self._pidfd is not None else ()
            for text in self._channel.receive(max(0.0, wait), also):
                self._handle(text)
            self._check_payload(deadline)
            if time.monotonic() >= deadline:
                break
        return self._take_results()

    def _check_payload(self, deadline: float) -> None:
        assert self.payload is not None and self._channel is not None
        rc = self.payload.poll()
        if rc is None and self._channel.closed_by_peer:
            # It hung up: it is exiting. Reap it, bounded by the caller's timeout.
            rc = self.payload.wait(timeout=max(0.0, min(2.0, deadline - time.monotonic())))
        if rc is None and self.range_timeout and self._in_flight:
            oldest = min(t for _, t in self._in_flight.values())
            if time.monotonic() - oldest > self.range_timeout:
                log.warning(
                    "no message from the payload for %.0f s: killing it", self.range_timeout
                )
                self.payload.kill_tree(
                    grace=5.0, reason_code=ErrorCode.LOOPINGJOB, reason="hung range"
                )
                self._payload_exited(
                    self.payload.returncode or -9, f"no progress for {self.range_timeout:.0f} s"
                )
                return
        if (
            rc is None
            and self.ready_timeout
            and not self._said_ready
            and time.monotonic() - self._launched_at > self.ready_timeout
        ):
            log.warning("payload did not ask for events in %.0f s: killing it", self.ready_timeout)
            self.payload.kill_tree(grace=5.0, reason_code=ErrorCode.ESRECOVERABLE, reason="silent")
            self._payload_exited(
                self.payload.returncode or -9,
                f"payload did not ask for events within {self.ready_timeout:.0f} s",
            )
            return
        if rc is not None:
            self._payload_exited(rc, "")

    def _payload_exited(self, rc: int, reason: str) -> None:
        assert self.payload is not None
        # Messages sent just before the exit are still in the socket.
        for _ in range(1000):
            if self._channel is None or not self._channel.connected:
                break
            texts = self._channel.receive(0.0)
            if not texts and not self._channel.connected:
                break
            for text in texts:
                self._handle(text)
            if not texts:
                break
        diag = diagnose_payload(rc, self._stderr_since_launch())
        self.exit_diagnosis = diag
        why = reason or diag.pilot_error_diag or f"exit code {rc}"
        for rid in list(self._in_flight):
            self._fail(rid, RangeStatus.FAILED, ErrorCode.ESRECOVERABLE, f"payload died: {why}")
        done = self._told_no_more and not self._queue
        if done:
            self._exited = True
            self._close_pidfd()
            log.info("event-service payload exited with %d after the last range", rc)
            return
        if self.restarts >= self.max_restarts:
            self._exited = True
            self._close_pidfd()
            code = diag.pilot_error_code or ErrorCode.ESRECOVERABLE
            self.error = PilotError(
                code, f"payload failed {self.restarts + 1} times, giving up; last: {why}"
            )
            log.error("%s", self.error)
            return
        self.restarts += 1
        log.warning("payload exited (%s): restart %d of %d", why, self.restarts, self.max_restarts)
        self._launch()

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            try:
                os.close(self._pidfd)
            except OSError:
                pass
            self._pidfd = None

    def _stderr_since_launch(self, max_bytes: int = 2048) -> str:
        """The stderr of the current payload run only: older runs must not colour the diagnosis."""
        try:
            with open(self.workdir / "payload.stderr", "rb") as fh:
                size = fh.seek(0, os.SEEK_END)
                fh.seek(max(self._stderr_offset, size - max_bytes))
                return fh.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def stop(self, grace: float) -> list[EventRange]:
        """Kill the payload tree; the ranges not done, for the caller to release."""
        self._stopped = True
        if self.payload is not None and self.payload.poll() is None:
            self.payload.kill_tree(grace=grace, reason_code=ErrorCode.KILLSIGNAL, reason="stopped")
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        self._close_pidfd()
        released = [r for r, _ in self._in_flight.values()] + list(self._queue)
        self._in_flight.clear()
        self._queue.clear()
        return released
