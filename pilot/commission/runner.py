"""Drive one pilot profile against its clone until the clone's jobs are taken or time is up.

A pilot that takes many jobs runs once; one that takes a job per process
(the PanDA pilot) is started again while its clone still has jobs waiting,
``slots`` processes at a time, as a pilot factory would. The number of
starts is bounded (twice the jobs, plus the slots), and every process is
ended with its whole tree when the run is stopped or its time is up.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pilot.commission.procs import PilotProcess, end_all
from pilot.commission.profiles import Profile, RunContext
from pilot.server.db import Store


@dataclass
class DriveResult:
    """What a drive did: processes started, their exit codes, time, and whether it timed out."""

    started: int = 0
    exit_codes: list[int | None] = field(default_factory=list)
    elapsed: float = 0.0
    timed_out: bool = False
    stopped: bool = False


def waiting_jobs(store: Store, queue: str) -> int:
    rows = store.query(
        "SELECT COUNT(*) AS n FROM jobs WHERE status = 'activated' AND site = ?", (queue,)
    )
    return int(rows[0]["n"])


class PilotDriver(threading.Thread):
    """Runs ``profile`` on ``ctx.queue`` in a thread; :meth:`stop` ends it and its processes.

    ``waiting()`` tells how many of the queue's jobs still wait for a pilot.
    """

    def __init__(
        self,
        profile: Profile,
        ctx: RunContext,
        waiting: Callable[[], int],
        n_jobs: int,
        timeout: float,
    ) -> None:
        super().__init__(name=f"pilot-{profile.name}", daemon=True)
        self.profile = profile
        self.ctx = ctx
        self.waiting = waiting
        self.n_jobs = n_jobs
        self.timeout = timeout
        self.result = DriveResult()
        self._stop_event = threading.Event()
        self._lock = threading.Lock()
        self._running: list[PilotProcess] = []

    def stop(self) -> None:
        self._stop_event.set()

    def processes(self) -> list[PilotProcess]:
        with self._lock:
            return list(self._running)

    def _start(self, n: int) -> PilotProcess:
        log = self.ctx.workdir / f"pilot-{n}.out"
        proc = PilotProcess(
            self.profile.argv(self.ctx, n),
            cwd=self.profile.cwd(self.ctx),
            env=self.profile.environment(self.ctx),
            log=log,
        )
        with self._lock:
            self._running.append(proc)
        self.result.started += 1
        return proc

    def run(self) -> None:
        start = time.monotonic()
        deadline = start + self.timeout
        one_each = self.profile.jobs_per_process > 0
        budget = (2 * self.n_jobs + self.profile.slots) if one_each else 1
        try:
            while not self._stop_event.is_set():
                for proc in self.processes():
                    rc = proc.poll()
                    if rc is not None:
                        proc.end(grace=1.0)  # its leftovers, if any
                        self.result.exit_codes.append(rc)
                        with self._lock:
                            self._running.remove(proc)
                running = len(self.processes())
                waiting = self.waiting()
                if running == 0 and (self.result.started >= budget or waiting == 0):
                    break
                if (
                    running < self.profile.slots
                    and waiting > 0
                    and self.result.started < budget
                    and (one_each or self.result.started == 0)
                ):
                    self._start(self.result.started + 1)
                    continue
                if time.monotonic() >= deadline:
                    self.result.timed_out = True
                    break
                self._stop_event.wait(0.5)
            self.result.stopped = self._stop_event.is_set()
        finally:
            left = self.processes()
            end_all(left)
            self.result.exit_codes += [proc.proc.returncode for proc in left]
            with self._lock:
                self._running.clear()
            self.result.elapsed = round(time.monotonic() - start, 2)


def log_tail(workdir: Path, n_chars: int = 2000) -> str:
    """The end of the last pilot log of a drive, for an operator's first look."""
    logs = sorted(workdir.glob("pilot-*.out"), key=lambda p: p.stat().st_mtime)
    return logs[-1].read_text(errors="replace")[-n_chars:] if logs else ""
