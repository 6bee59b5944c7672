"""The limits a payload must stay within, from the job and the queue.

Where each limit comes from (PanDA's keys; 0 everywhere means "no limit"):

- memory (kB, compared with the tree's PSS): the queue's ``maxrss`` (MB) if
  set, else the job's ``minRamCount`` (MB) times ``ram_slack`` (default 2:
  a job's request is what it expects to use, not a cap, so it gets the same
  head-room the PanDA pilot gives). The larger of the two when both are set,
  because the broker only sends a job to a queue whose ``maxrss`` covers it.
- looping (s): 2 hours, or the job's ``maxCpuCount`` when longer (the PanDA
  pilot's rule), or the queue's ``looping_limit`` when given.
- walltime (s): the smaller of the job's ``maxWalltime`` and the queue's
  ``maxtime`` (the batch slot ends at the latter whatever the job asked).
- work directory (MB): the queue's ``maxwdir``, else the job's ``maxDiskCount``.
- free local space (MB): 2 GB by default (the PanDA pilot's default), or the
  queue's ``min_free_space_mb``.
- payload stdout (MB): 2 GB by default (the PanDA pilot's default), or the
  queue's ``max_stdout_mb``.

``scale`` multiplies every limit (time and sizes alike) so that tests can run
the real checks against real payloads in seconds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from pilot.errors import ErrorCode, PilotError
from pilot.job import Job
from pilot.queue import queue_number

LOOPING_DEFAULT_S = 2 * 3600
FREE_SPACE_DEFAULT_MB = 2048
STDOUT_DEFAULT_MB = 2048
RAM_SLACK = 2.0


@dataclass(frozen=True)
class Limits:
    """Limits in the units the monitor compares against; 0 disables a limit."""

    memory_kb: int = 0
    looping_s: float = 0
    walltime_s: float = 0
    workdir_max_mb: float = 0
    min_free_space_mb: float = 0
    stdout_max_mb: float = 0

    @classmethod
    def from_job(
        cls,
        job: Job | None = None,
        queue: Mapping[str, Any] | None = None,
        *,
        scale: float = 1.0,
        ram_slack: float = RAM_SLACK,
    ) -> Limits:
        """Build the limits of one job on one queue (see the module docstring for the rules)."""
        q = queue or {}
        max_rss = _number(q, "maxrss")
        min_ram = job.min_ram_count if job else 0
        memory_mb = max(max_rss, min_ram * ram_slack)
        looping = _number(q, "looping_limit") or max(
            LOOPING_DEFAULT_S, job.max_cpu_count if job else 0
        )
        walltimes = [t for t in (job.max_walltime if job else 0, _number(q, "maxtime")) if t > 0]
        workdir = _number(q, "maxwdir") or (job.max_disk_count if job else 0)
        free = _number(q, "min_free_space_mb") or FREE_SPACE_DEFAULT_MB
        stdout = _number(q, "max_stdout_mb") or STDOUT_DEFAULT_MB
        limits = cls(
            memory_kb=int(memory_mb * 1024),
            looping_s=looping,
            walltime_s=min(walltimes) if walltimes else 0,
            workdir_max_mb=workdir,
            min_free_space_mb=free,
            stdout_max_mb=stdout,
        )
        return limits.scaled(scale) if scale != 1.0 else limits

    def scaled(self, factor: float) -> Limits:
        """Every limit times ``factor`` (for tests: 0.001 turns hours into seconds)."""
        if factor <= 0:
            raise PilotError(ErrorCode.BADQUEUECONFIGURATION, f"limit scale {factor} must be > 0")
        return replace(
            self,
            memory_kb=int(self.memory_kb * factor),
            looping_s=self.looping_s * factor,
            walltime_s=self.walltime_s * factor,
            workdir_max_mb=self.workdir_max_mb * factor,
            min_free_space_mb=self.min_free_space_mb * factor,
            stdout_max_mb=self.stdout_max_mb * factor,
        )

    def describe(self) -> str:
        """One line for the pilot log, so operators see what the job was held to."""
        parts = [
            f"memory={self.memory_kb}kB" if self.memory_kb else "memory=none",
            f"looping={self.looping_s:g}s" if self.looping_s else "looping=none",
            f"walltime={self.walltime_s:g}s" if self.walltime_s else "walltime=none",
            f"workdir={self.workdir_max_mb:g}MB" if self.workdir_max_mb else "workdir=none",
            f"minfree={self.min_free_space_mb:g}MB" if self.min_free_space_mb else "minfree=none",
            f"stdout={self.stdout_max_mb:g}MB" if self.stdout_max_mb else "stdout=none",
        ]
        return "limits: " + " ".join(parts)


def _number(queue: Mapping[str, Any], key: str) -> float:
    return queue_number(queue, key, code=ErrorCode.BADQUEUECONFIGURATION)
