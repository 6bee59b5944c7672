"""Run one event-service payload and feed it event ranges.

:class:`EventExecutor` is driven from outside and never blocks for longer
than the ``timeout`` given to :meth:`EventExecutor.poll`: the single-node
engine (:mod:`pilot.onenode`) and an MPI Droid both call it between
their own duties. Ranges go in with :meth:`add_ranges`, results come out of
:meth:`poll` as :class:`RangeResult` with the output renamed into place and
checksummed.

Two modes, chosen by ``mode=`` or, by default, from the job's command:

* ``protocol``: the payload is AthenaMP (or speaks as it does) over yampl's
  ZeroMQ transport (:mod:`pilot.eventservice.yampl`); the channel name, new
  for every payload process, is written into its command as PanDA Pilot 3
  writes it (:mod:`pilot.eventservice.channelname`), and the command runs
  through ``/bin/sh`` (in the job's container when there is one, with the
  socket bound in). One range answers each ``Ready for events``, to the
  peer that asked; ``No more events`` goes once to each peer. The payload is
  restarted after a crash, at most ``max_restarts`` times.
* ``command``: the job's ``transformation``/``jobPars`` hold placeholders
  (``{eventRangeID}``, ``{startEvent}``, ``{lastEvent}``, ``{LFN}``,
  ``{GUID}``, ``{outputFile}``) and one process runs per range
  (:mod:`pilot.eventservice.command`). A command holding any placeholder
  selects this mode.

A ZeroMQ peer that dies says nothing, so the payload's process is watched
(its pidfd wakes the wait). What ends a payload, and the code it gives:

* it dies: the ranges it held fail with 1224 ESRECOVERABLE and the diagnosis
  of the exit; it is restarted;
* it has not said ``Ready for events`` ``ready_timeout`` seconds after its
  start (it never connected, or cannot read its channel name): it is killed
  and the executor gives up with 1317 EXCEEDEDMAXWAITTIME;
* a range has been out for ``range_timeout`` seconds (the lease): it is
  killed, that range and the others it held fail with 1375 LEASETIME, and it
  is restarted;
* ``final_wait`` seconds after ``No more events`` it still holds ranges or
  still runs: it is killed and what it held fails with 1317.
* it breaks a limit of the job's guard rails (:class:`pilot.payload.guard.Guard`:
  memory 1235, looping 1150, walltime 1213, work directory 1104, stdout 1106,
  a refused connection 1008): its whole tree is killed and the ranges it held
  fail with that code; it is restarted, except after a breach no new process
  can cure (walltime, work directory, stdout, connection), when the executor
  gives up with that code.

``ERR_`` messages map as :mod:`pilot.eventservice.messages` documents.
Messages about unknown or already reported ranges, and messages that cannot
be read (not UTF-8, over 1 MiB, several frames), are logged and dropped:
the range stays held and ends by one of the rules above, never silently.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import time
from collections import deque
from dataclasses import replace
from pathlib import Path
from typing import Any

from pilot.errors import ErrorCode, PilotError, diagnose_payload
from pilot.eventservice.channelname import with_channel
from pilot.eventservice.command import CommandExecutor
from pilot.eventservice.held import (
    FINAL_WAIT,
    PLACEHOLDERS,
    READY_TIMEOUT,
    HeldRanges,
    payload_command,
    resolve_mode,
    split_command,
)
from pilot.eventservice.messages import (
    NO_MORE,
    BadMessage,
    DoneMessage,
    ErrorMessage,
    ReadyMessage,
    parse_message,
    range_message,
)
from pilot.eventservice.model import RangeResult, RangeStatus
from pilot.eventservice.yampl import Incoming, RangeChannel, unique_channel_name
from pilot.job import EventRange, Job
from pilot.payload.container import wrap
from pilot.payload.runner import PayloadProcess

log = logging.getLogger(__name__)

# Longest a single poll() sleeps before looking at the payload process again.
_CHECK_INTERVAL = 1.0
# Messages read from a payload that exited, before its ranges are failed.
_MAX_DRAIN = 100

__all__ = [
    "FINAL_WAIT",
    "PLACEHOLDERS",
    "READY_TIMEOUT",
    "EventExecutor",
    "payload_command",
    "resolve_mode",
    "split_command",
]


class EventExecutor(HeldRanges):
    """One event-service payload for one job, fed ranges from outside."""

    def __new__(cls, job: Job, workdir: Path, **kwargs: Any) -> Any:
        """``EventExecutor(...)`` gives the executor the job's command asks for: a
        :class:`CommandExecutor` when it holds placeholders (already initialised,
        since it is no EventExecutor)."""
        if cls is EventExecutor and resolve_mode(job, kwargs.get("mode")) == "command":
            return CommandExecutor(job, workdir, **kwargs)
        return super().__new__(cls)

    def __init__(self, job: Job, workdir: Path, **kwargs: Any) -> None:
        super().__init__(job, workdir, **kwargs)
        self._channel: RangeChannel | None = None
        self._requests: deque[bytes] = deque()  # one peer per "Ready for events" not answered
        self._told: set[bytes] = set()  # peers sent "No more events"
        self._no_more_at: float | None = None
        self._stderr_offset = 0
        self._pidfd: int | None = None
        self._launched_at = 0.0
        self._said_ready = False

    # -- protocol mode -------------------------------------------------------
    def _command_text(self) -> str:
        if self.command:
            return shlex.join(self.command)
        text = payload_command(self.job)
        split_command(text)  # a command that cannot be parsed fails here, clearly
        return text

    @property
    def channel_name(self) -> str:
        return self._channel.name if self._channel is not None else ""

    def start(self) -> None:
        """Start the payload; once: a second call while one runs starts no second payload
        (it would be forgotten, and outlive the job)."""
        if self.payload is not None and self.payload.poll() is None:
            log.warning("start(): the payload runs already (pid %d)", self.payload.pid)
            return
        self._check_transformation()
        self._launch()

    def _check_transformation(self) -> None:
        """A transform that is not there fails now, not after a shell and its restarts."""
        first = split_command(self._command_text())[0]
        if "=" in first or first in ("export", "cd", "source", "."):
            return  # a shell preamble: the shell will tell
        found = (self.workdir / first).is_file() if "/" not in first else Path(first).is_file()
        if not found and shutil.which(first) is None:
            raise PilotError(ErrorCode.TRANSFORMNOTFOUND, f"payload command not found: {first}")

    def _launch(self) -> None:
        self._close_channel()
        self._channel = RangeChannel(unique_channel_name())
        command = with_channel(self._command_text(), self._channel.name)
        self.payload_command = command
        if self.container is not None:
            # yampl fixes the socket under /tmp: the container must see that very file.
            spec = replace(self.container, binds=(*self.container.binds, str(self._channel.path)))
            argv = wrap(command, self.workdir, spec)
        else:
            argv = ["/bin/sh", "-c", command]
        self._requests.clear()
        self._told.clear()
        self._no_more_at = None
        self._exited = False
        self._said_ready = False
        self._launched_at = time.monotonic()
        stderr = self.workdir / "payload.stderr"
        self._stderr_offset = stderr.stat().st_size if stderr.exists() else 0
        try:
            self.payload = PayloadProcess(
                argv,
                cwd=self.workdir,
                env=dict(self.env if self.env is not None else os.environ),
                stdout=self.workdir / "payload.stdout",
                stderr=self.workdir / "payload.stderr",
            )
        except PilotError:
            self._close_channel()
            raise
        self.guard.watch(self.payload)
        self._close_pidfd()
        try:
            # Readable when the payload exits: ZeroMQ would never tell us.
            self._pidfd = os.pidfd_open(self.payload.pid)
        except (AttributeError, OSError):
            self._pidfd = None
        log.info(
            "event-service payload started, pid %d, channel %s (restart %d)",
            self.payload.pid,
            self._channel.name,
            self.restarts,
        )

    def _pfn(self, r: EventRange) -> str:
        """Where the payload reads the range's file: PanDA's PFN, else the staged-in copy."""
        if r.pfn:
            return r.pfn
        local = self.workdir / r.lfn
        return str(local) if r.lfn and local.is_file() else r.lfn

    def _dispatch(self) -> None:
        if self._channel is None or self.mode != "protocol":
            return
        while self._requests:
            peer = self._requests[0]
            if peer in self._told:
                self._requests.popleft()  # asked again after "No more events": nothing to say
                continue
            if self._queue:
                r = self._queue.popleft()
                try:
                    text = range_message(r, self._pfn(r))
                except PilotError as exc:
                    log.warning("%s", exc.detail)
                    self._fail(r.event_range_id, RangeStatus.FAILED, exc.code, exc.detail)
                    continue
                self._requests.popleft()
                if self._channel.send(peer, text):
                    self._in_flight[r.event_range_id] = (r, time.monotonic())
                    self.guard.progress()  # the looping clock of a range starts when it is sent
                else:
                    self._queue.appendleft(r)  # that peer is gone: the range waits for the next
            elif self._no_more:
                self._requests.popleft()
                if self._channel.send(peer, NO_MORE):
                    self._told.add(peer)
                    if self._no_more_at is None:
                        self._no_more_at = time.monotonic()
            else:
                break

    def _handle(self, incoming: Incoming) -> None:
        if incoming.text is None:
            self.bad_messages += 1
            log.warning("payload message refused: %s", incoming.error)
            return
        msg = parse_message(incoming.text)
        self.guard.progress()  # a payload that talks is not looping
        if isinstance(msg, ReadyMessage):
            self._said_ready = True
            self._requests.append(incoming.peer)
            self._dispatch()
        elif isinstance(msg, DoneMessage):
            if not self._unexpected(msg.event_range_id, "done"):
                self._done(msg.event_range_id, msg.paths, msg.cpu, msg.wall)
        elif isinstance(msg, ErrorMessage):
            if not self._unexpected(msg.event_range_id, msg.acronym):
                self._fail(msg.event_range_id, msg.status, msg.code, f"{msg.acronym}: {msg.diag}")
        elif isinstance(msg, BadMessage):
            self.bad_messages += 1
            log.warning("payload message dropped (%s): %r", msg.reason, msg.text[:200])

    def poll(self, timeout: float) -> list[RangeResult]:
        deadline = time.monotonic() + max(0.0, timeout)
        while not self._pending:
            if self._stopped or self._exited or self.payload is None or self._channel is None:
                if not self.finished:
                    # Nothing can happen: honour the timeout so a caller's loop does not spin.
                    time.sleep(max(0.0, deadline - time.monotonic()))
                break
            wait = min(_CHECK_INTERVAL, deadline - time.monotonic(), self.guard.next_due())
            also = (self._pidfd,) if self._pidfd is not None else ()
            for incoming in self._channel.receive(max(0.0, wait), also):
                self._handle(incoming)
            self._check_payload()
            if time.monotonic() >= deadline:
                break
        return self._take_results()

    def _check_payload(self) -> None:
        assert self.payload is not None
        rc = self.payload.poll()
        if rc is not None:
            self._payload_exited(rc, "")
            return
        if not self._in_flight:
            self.guard.progress()  # waiting for ranges from us is not looping
        breach = self.guard.check()
        if breach is not None:
            self._breached(breach)
            return
        now = time.monotonic()
        if self.range_timeout and self._in_flight:
            oldest = min(t for _, t in self._in_flight.values())
            if now - oldest > self.range_timeout:
                why = f"no report of a range for {self.range_timeout:.0f} s (lease)"
                log.warning("%s: killing the payload", why)
                self.payload.kill_tree(grace=5.0, reason_code=ErrorCode.LEASETIME, reason=why)
                self._payload_exited(self.payload.returncode or -9, why, ErrorCode.LEASETIME)
                return
        if (
            self.ready_timeout
            and not self._said_ready
            and now - self._launched_at > self.ready_timeout
        ):
            why = (
                f"payload did not ask for events within {self.ready_timeout:.0f} s of its start"
                f" (channel {self.channel_name}): it did not connect, or not to this channel"
            )
            self._give_up(why)
            return
        if (
            self.final_wait is not None
            and self._no_more_at is not None
            and now - self._no_more_at > self.final_wait
        ):
            self._give_up(f"payload still running {self.final_wait:.0f} s after No more events")

    def _breached(self, breach: PilotError) -> None:
        """A limit of the job's guard broken: the payload's tree is killed and the ranges it
        held fail with the breach's code; a new payload takes the next ranges unless no new
        process can cure it (the job's walltime, work directory, stdout: see
        :meth:`Guard.fatal`), and then the executor gives up with that code."""
        assert self.payload is not None
        self.guard.kill(self.payload, breach)
        if not self.guard.fatal(breach):
            self._payload_exited(self.payload.returncode or -9, breach.detail, breach.code)
            return
        for rid in list(self._in_flight):
            self._fail(rid, RangeStatus.FAILED, breach.code, f"payload killed: {breach.detail}")
        self._ended()
        self.error = breach

    def _give_up(self, why: str) -> None:
        """Kill the payload for good: what it held fails with 1317 and it is not restarted."""
        assert self.payload is not None
        log.warning("%s: killing it", why)
        self.payload.kill_tree(grace=5.0, reason_code=ErrorCode.EXCEEDEDMAXWAITTIME, reason=why)
        for rid in list(self._in_flight):
            self._fail(rid, RangeStatus.FAILED, ErrorCode.EXCEEDEDMAXWAITTIME, why)
        self._ended()
        if not (self._told and not self._queue):
            self.error = PilotError(ErrorCode.EXCEEDEDMAXWAITTIME, why)

    def _payload_exited(self, rc: int, reason: str, code: int = ErrorCode.ESRECOVERABLE) -> None:
        assert self.payload is not None and self._channel is not None
        self.guard.ended(self.payload)  # what it left behind goes with it
        # Reports sent just before the exit are still in the socket.
        for _ in range(_MAX_DRAIN):
            batch = self._channel.receive(0.0)
            if not batch:
                break
            for incoming in batch:
                self._handle(incoming)
        diag = diagnose_payload(rc, self._stderr_since_launch())
        self.exit_diagnosis = diag
        why = reason or diag.pilot_error_diag or f"exit code {rc}"
        for rid in list(self._in_flight):
            self._fail(
                rid, RangeStatus.FAILED, code, f"payload {'killed' if reason else 'died'}: {why}"
            )
        if self._told and not self._queue:
            self._ended()
            log.info("event-service payload exited with %d after the last range", rc)
            return
        hopeless = diag.pilot_error_code == ErrorCode.TRANSFORMNOTFOUND and not self._said_ready
        if self.restarts >= self.max_restarts or hopeless:
            self._ended()
            if code in (ErrorCode.ESRECOVERABLE, ErrorCode.LEASETIME):  # a guard's code stays
                code = diag.pilot_error_code or ErrorCode.ESRECOVERABLE
            self.error = PilotError(
                code, f"payload failed {self.restarts + 1} times, giving up; last: {why}"
            )
            log.error("%s", self.error)
            return
        self.restarts += 1
        log.warning("payload exited (%s): restart %d of %d", why, self.restarts, self.max_restarts)
        self._launch()

    def _ended(self) -> None:
        """The payload is gone for good: no restart, nothing of its tree left, its channel
        and pidfd closed."""
        self._exited = True
        self.guard.ended(self.payload)
        self._close_pidfd()
        self._close_channel()

    def _close_channel(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

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
        self.guard.ended(self.payload)
        self._close_channel()
        self._close_pidfd()
        released = [r for r, _ in self._in_flight.values()] + list(self._queue)
        self._in_flight.clear()
        self._queue.clear()
        return released
