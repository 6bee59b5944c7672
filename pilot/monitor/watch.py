"""Watch a running payload and say when it breaks a limit, with PanDA's code.

The monitor never kills: :meth:`JobMonitor.check` returns the breach and the
workflow saves :meth:`JobMonitor.evidence` first, then kills the tree, then
fails the job with ``breach.code``. The intended loop::

    while payload.wait(timeout=monitor.next_due()) is None:
        breach = monitor.check()
        if breach:
            monitor.save_evidence()
            payload.kill_tree(grace, breach.code, breach.detail)
            ...fail the job with breach.code...

Cost: one sample of the tree every ``interval`` (default 30 s); the work
directory is walked every ``disk_interval`` (default 4 intervals), because
a walk of a large directory costs more than a process sample.

Looping: a job is looping when nothing in the work directory was touched
*and* the tree made no progress for the looping limit. Progress is CPU time
advancing (at least ``MIN_CPU_PROGRESS`` of a core over the interval) or
bytes written; a payload stuck on a dead server or a lock burns neither.
The monitor's own files in the work directory are not counted as touches.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from pilot.errors import ErrorCode, PilotError
from pilot.fileio import atomic_write_text
from pilot.job import Job
from pilot.monitor.connections import (
    CONNECTION_INTERVAL,
    TRACER_LOG,
    ConnectionPolicy,
    ConnectionWatch,
    connection_policy,
    network_isolated,
)
from pilot.monitor.limits import Limits
from pilot.monitor.sampler import OUTPUT_NAME, SUMMARY_NAME, Sample, Sampler
from pilot.payload.runner import PayloadProcess

DEFAULT_INTERVAL = 30.0
MIN_CPU_PROGRESS = 0.01  # fraction of a core over an interval that counts as working
EVIDENCE_NAME = "monitor_evidence.txt"
_OWN_FILES = {OUTPUT_NAME, SUMMARY_NAME, EVIDENCE_NAME}
_MAX_WALK = 200_000  # entries; a work directory larger than this is sized approximately
MB = 1024 * 1024


class JobMonitor:
    """Samples a payload's tree and checks every limit of :class:`Limits`."""

    def __init__(
        self,
        payload: PayloadProcess,
        workdir: str | Path,
        limits: Limits,
        policy: ConnectionPolicy | None = None,
        interval: float = DEFAULT_INTERVAL,
        *,
        disk_interval: float | None = None,
        series: str | Path | None = None,
        clock: Callable[[], float] = time.time,
        connection_interval: float = CONNECTION_INTERVAL,
        isolated: bool = False,
        connections: ConnectionWatch | None = None,
        started: float | None = None,
    ) -> None:
        self.payload = payload
        self.workdir = Path(workdir)
        self.limits = limits
        self.interval = max(float(interval), 0.05)
        self.disk_interval = float(disk_interval) if disk_interval else 4 * self.interval
        self._clock = clock
        self.sampler = Sampler(
            payload, series if series is not None else self.workdir / OUTPUT_NAME, clock=clock
        )
        # One watch per job when the job's payload is restarted (the guard's): what an
        # earlier process of the job did is still held against it.
        self.connections = connections or ConnectionWatch(self.workdir, policy, isolated=isolated)
        self.connection_interval = max(float(connection_interval), 0.05)
        # The walltime runs from ``started`` (the job's start, across restarts).
        begun = getattr(payload, "start_time", None) or clock()
        self.started = started or begun
        self._next_sample = begun
        self._next_connections = begun
        self._next_disk = begun
        self.last_progress = begun
        self.last_touch = begun
        self.workdir_mb = 0.0
        self.breach: PilotError | None = None
        self._last_cpu = 0.0
        self._last_wchar = 0

    # -- scheduling ------------------------------------------------------------
    def next_due(self, now: float | None = None) -> float:
        """Seconds until :meth:`check` has work to do (0 when overdue)."""
        now = self._clock() if now is None else now
        due = min(self._next_sample, self._next_disk, self._next_connections)
        if self.limits.walltime_s:
            due = min(due, self.started + self.limits.walltime_s)
        return max(0.0, due - now)

    def progress(self, now: float | None = None) -> None:
        """Count ``now`` as progress: an event-service payload that waits for its next range
        (or has just reported one) is not looping, whatever its CPU says."""
        self.last_progress = max(self.last_progress, self._clock() if now is None else now)

    # -- checking ----------------------------------------------------------------
    def check(self, now: float | None = None) -> PilotError | None:
        """Sample when due and check every limit; the first breach, or ``None``.

        Once a breach was found it is returned again on later calls, so the
        caller cannot lose it between deciding and killing.
        """
        if self.breach is not None:
            return self.breach
        now = self._clock() if now is None else now
        breach = self._check_walltime(now)
        if breach is None and now >= self._next_sample:
            self._next_sample = now + self.interval
            breach = self._sample_and_check(now)
        if breach is None and now >= self._next_connections:
            self._next_connections = now + self.connection_interval
            breach = self.connections.look(self.payload, now)
        if breach is None and now >= self._next_disk:
            self._next_disk = now + self.disk_interval
            breach = self._check_disk(now)
        if breach is None:
            breach = self._check_looping(now)
        self.breach = breach
        return breach

    def _check_walltime(self, now: float) -> PilotError | None:
        limit = self.limits.walltime_s
        if limit and now - self.started > limit:
            return PilotError(
                ErrorCode.REACHEDMAXTIME,
                f"payload ran {now - self.started:.0f} s, over the walltime limit of {limit:g} s",
            )
        return None

    def _sample_and_check(self, now: float) -> PilotError | None:
        prev = self.sampler.latest
        s = self.sampler.sample(now)
        if prev is not None:
            cpu_step = s.cpu - prev.cpu
            wall_step = max(now - prev.Time, self.interval)
            if cpu_step >= MIN_CPU_PROGRESS * wall_step or s.wchar > prev.wchar:
                self.last_progress = now
        limit = self.limits.memory_kb
        if limit and s.pss > limit:
            return PilotError(
                ErrorCode.PAYLOADEXCEEDMAXMEM,
                f"payload PSS {s.pss} kB (RSS {s.rss} kB, {s.nprocs} processes) over the "
                f"limit of {limit} kB",
            )
        return self._check_stdout()

    def _check_stdout(self) -> PilotError | None:
        limit = self.limits.stdout_max_mb
        if not limit:
            return None
        for path in (self.payload.stdout_path, self.payload.stderr_path):
            if path is None:
                continue
            try:
                size = path.stat().st_size
            except OSError:
                continue
            if size > limit * MB:
                return PilotError(
                    ErrorCode.STDOUTTOOBIG,
                    f"{path.name} is {size / MB:.1f} MB, over the limit of {limit:g} MB",
                )
        return None

    def _check_disk(self, now: float) -> PilotError | None:
        size, newest = _walk(self.workdir)
        self.workdir_mb = size / MB
        if newest > self.last_touch:
            self.last_touch = newest
        limit = self.limits.workdir_max_mb
        if limit and size > limit * MB:
            return PilotError(
                ErrorCode.USERDIRTOOLARGE,
                f"work directory is {size / MB:.1f} MB, over the limit of {limit:g} MB",
            )
        minimum = self.limits.min_free_space_mb
        if minimum:
            try:
                free = shutil.disk_usage(self.workdir).free
            except OSError as exc:
                return PilotError(ErrorCode.NOLOCALSPACE, f"cannot stat the work directory: {exc}")
            if free < minimum * MB:
                return PilotError(
                    ErrorCode.NOLOCALSPACE,
                    f"{free / MB:.0f} MB free where the work directory is, "
                    f"below the minimum of {minimum:g} MB",
                )
        return None

    def _check_looping(self, now: float) -> PilotError | None:
        limit = self.limits.looping_s
        if not limit:
            return None
        last = max(self.last_progress, self.last_touch)
        # Judge only on fresh information: a sample and a walk since the limit began.
        if now - last > limit and self.sampler.count:
            idle = now - last
            return PilotError(
                ErrorCode.LOOPINGJOB,
                f"no file in the work directory touched and no CPU progress for {idle:.0f} s "
                f"(looping limit {limit:g} s)",
            )
        return None

    # -- results -------------------------------------------------------------------
    def summary(self) -> dict[str, int]:
        """updateJob fields (maxRSS ... cpuConsumptionTime) from the samples so far."""
        return self.sampler.summary()

    def job_metrics(self) -> str:
        return self.sampler.job_metrics()

    def connection_breach(self) -> PilotError | None:
        """The policy's verdict on every connection seen so far (None: nothing held against it)."""
        return self.connections.breach()

    def connections_report(self) -> str:
        """Connections seen, for the log extracts ('' when none)."""
        # A last read of the tracer log: the payload may have connected after the last sample.
        for conn in self.connections.tracer.read_new():
            self.connections.add(conn)
        return self.connections.report()

    def close(self) -> None:
        """Write the prmon-style JSON summary; call after the payload ended."""
        self.sampler.write_summary()

    def evidence(self, max_samples: int = 10) -> str:
        """Last samples, the live process tree and the connections: what to keep before a kill."""
        lines = []
        if self.breach is not None:
            lines.append(
                f"breach: {int(self.breach.code)} {self.breach.acronym}: {self.breach.detail}"
            )
        lines.append(self.limits.describe())
        lines.append(
            f"workdir {self.workdir_mb:.1f} MB; last touch {_ago(self.last_touch)}; "
            f"last CPU/write progress {_ago(self.last_progress)}"
        )
        lines.append("last samples:")
        lines.append("  " + "\t".join(Sample.__dataclass_fields__))
        for s in list(self.sampler.last)[-max_samples:]:
            lines.append("  " + s.row())
        lines.append("process tree:")
        lines.extend(process_tree(self.payload.processes()))
        report = self.connections.report()
        if report:
            lines.append(report)
        return "\n".join(lines) + "\n"

    def save_evidence(self, path: str | Path | None = None) -> Path:
        """Write :meth:`evidence` to the work directory (or ``path``) and return where."""
        target = Path(path) if path else self.workdir / EVIDENCE_NAME
        atomic_write_text(target, self.evidence(), fsync=False)
        return target


def process_tree(procs: list[psutil.Process], width: int = 120) -> list[str]:
    """One line per process: pid, ppid, status, RSS, CPU, command line (cut)."""
    rows = []
    for p in sorted(procs, key=lambda q: q.pid):
        try:
            with p.oneshot():
                cpu = p.cpu_times()
                cmd = " ".join(p.cmdline()) or p.name()
                rows.append(
                    f"  {p.pid:>7} {p.ppid():>7} {p.status():<9} "
                    f"{p.memory_info().rss // 1024:>9}kB {cpu.user + cpu.system:>8.1f}s {cmd}"[
                        :width
                    ]
                )
        except psutil.Error:
            continue
    return rows or ["  (no live process)"]


def _walk(root: Path) -> tuple[int, float]:
    """Total size and newest mtime under ``root``, skipping the monitor's own files."""
    total, newest, seen = 0, 0.0, 0
    stack = [root]
    while stack and seen < _MAX_WALK:
        directory = stack.pop()
        try:
            it = os.scandir(directory)
        except OSError:
            continue
        with it:
            for entry in it:
                seen += 1
                try:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(Path(entry.path))
                        continue
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                total += st.st_size
                if directory == root and entry.name in _OWN_FILES:
                    continue
                if entry.name == TRACER_LOG and directory == root:
                    continue  # written on connect; a connection is not progress on disk
                newest = max(newest, st.st_mtime)
    return total, newest


def _ago(t: float) -> str:
    return f"{max(0.0, time.time() - t):.0f} s ago"


def make_monitor(payload: PayloadProcess, workdir: Path, job: Job, config: Any) -> JobMonitor:
    """The workflow's monitor factory: limits from the job and ``config.queue``.

    Reads, when the configuration has them, ``monitor_interval``,
    ``connection_policy`` (a :meth:`ConnectionPolicy.from_spec` string, or
    the queue's ``connection_policy``) and ``limit_scale``.
    """
    queue = getattr(config, "queue", None) or {}
    limits = Limits.from_job(job, queue, scale=float(getattr(config, "limit_scale", 1.0) or 1.0))
    policy = connection_policy(config)
    interval = float(getattr(config, "monitor_interval", DEFAULT_INTERVAL) or DEFAULT_INTERVAL)
    isolated = network_isolated(config, policy)
    return JobMonitor(payload, workdir, limits, policy, interval, isolated=isolated)
