"""The guard rails every payload runs within, whoever starts it (docs/DESIGN.md, "Guard rails").

A single-node job (:mod:`pilot.workflow`), the single-node event service,
every Droid's event-service payload (:mod:`droid.executors`) and every whole
job of a ManyToOne worker (:mod:`pilot.wholejobs`) start their payloads the
same way: one :class:`Guard` per job, built from the job and the pilot's
configuration, gives

- the payload's environment (the pilot's credentials removed, the connection
  tracer on) and its container (the queue's runtime, the job's image, no
  network under a deny-all policy);
- a monitor for each payload process it starts (:meth:`Guard.watch`), with
  the job's limits (memory, looping, walltime, work directory, free space,
  stdout size: :class:`pilot.monitor.limits.Limits`) and the connection
  policy; one connection watch and one walltime clock per job, so a restarted
  payload is held to what the job did before it;
- the kill of the whole tree with the breach's code (:meth:`Guard.kill`) and,
  after every end however it came, the kill of what is left of the tree,
  orphans included (:meth:`Guard.ended`);
- which breaches a restart cannot cure (:meth:`Guard.fatal`): the walltime is
  the job's, the work directory and the stdout file are the job's, a
  connection the policy refuses would be tried again.

The guard never blocks: its caller sleeps ``next_due()`` at most (on the
payload's pidfd, or its message socket) and calls ``check()``.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

from pilot.errors import ErrorCode, PilotError
from pilot.job import Job
from pilot.monitor.connections import (
    ConnectionPolicy,
    ConnectionWatch,
    connection_policy,
    network_isolated,
)
from pilot.monitor.limits import Limits
from pilot.monitor.pytracer import TRACER_DIR
from pilot.monitor.watch import DEFAULT_INTERVAL, JobMonitor
from pilot.payload.command import payload_environment
from pilot.payload.container import ContainerSpec
from pilot.payload.runner import KillRecord, PayloadProcess, become_subreaper
from pilot.payload.secrets import secret_paths

log = logging.getLogger(__name__)

# Breaches after which the job's payload is not started again: the limit is the job's,
# not the process's, and a new process would meet it at once.
FATAL_CODES = frozenset(
    {
        ErrorCode.REACHEDMAXTIME,
        ErrorCode.USERDIRTOOLARGE,
        ErrorCode.NOLOCALSPACE,
        ErrorCode.STDOUTTOOBIG,
        ErrorCode.GENERALERROR,  # a connection the policy refuses
    }
)

MonitorFactory = Callable[[PayloadProcess], Any]


def payload_container(
    job: Job, config: Any, policy: ConnectionPolicy | None = None
) -> ContainerSpec | None:
    """The container a job's payload runs in, or None: the queue's runtime with the
    job's image, no network when the connection policy denies every connection
    (enforced, not only detected), the connection tracer visible, and the pilot's own
    credentials covered."""
    spec = getattr(config, "container", None)
    if spec is None:
        return None
    if job.container_name:
        spec = replace(spec, image=job.container_name)
    policy = policy or connection_policy(config)
    return replace(
        spec,
        network=spec.network and not policy.denies_all,
        ro_binds=(*spec.ro_binds, str(TRACER_DIR)),
        hide=(
            *spec.hide,
            *secret_paths(os.environ),
            *tuple(getattr(config, "secret_files", ()) or ()),
        ),
    )


def wall_limit(job: Job, config: Any) -> float:
    """Walltime the payload may use: the job's, else the queue's, else none."""
    queue = getattr(config, "queue", None) or {}
    limits = [v for v in (job.max_walltime, int(queue.get("maxtime", 0) or 0)) if v > 0]
    return float(min(limits)) if limits else math.inf


class Guard:
    """One job's guard rails, for every payload process started for it."""

    def __init__(
        self,
        job: Job,
        workdir: str | Path,
        config: Any,
        *,
        monitored: bool = True,
        monitor_factory: MonitorFactory | None = None,
        clock: Callable[[], float] = time.time,
        started: float | None = None,
    ) -> None:
        self.job = job
        self.workdir = Path(workdir)
        self.config = config
        self._clock = clock
        queue = getattr(config, "queue", None) or {}
        scale = float(getattr(config, "limit_scale", 1.0) or 1.0)
        self.limits = Limits.from_job(job, queue, scale=scale)
        self.policy = connection_policy(config)  # host names in an allow-list resolve once
        self.isolated = network_isolated(config, self.policy)
        self.interval = float(getattr(config, "monitor_interval", 0) or DEFAULT_INTERVAL)
        self.kill_grace = float(getattr(config, "kill_grace", 10.0))
        self.container = payload_container(job, config, self.policy)
        self.connections = ConnectionWatch(self.workdir, self.policy, isolated=self.isolated)
        self.monitored = monitored
        self._factory = monitor_factory
        # the job's walltime runs from here, across restarts (a Droid: from when rank 0
        # started the job, not from when this rank first ran a range of it)
        self.started = clock() if started is None else float(started)
        self.monitor: Any = None
        self.monitors = 0  # payload processes watched
        self._earlier: list[tuple[dict[str, int], int]] = []  # summaries of ended monitors
        self.subreaper = become_subreaper()

    @classmethod
    def bare(cls, job: Job, workdir: str | Path, kill_grace: float = 5.0) -> Guard:
        """No limits and no monitor: only the kill of the whole tree and the orphans' end
        (for an executor built without a configuration, as unit tests build it)."""
        from types import SimpleNamespace

        return cls(job, workdir, SimpleNamespace(kill_grace=kill_grace), monitored=False)

    # -- what the payload is started with ----------------------------------------
    def environment(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """The payload's environment (:func:`pilot.payload.command.payload_environment`)."""
        return payload_environment(
            self.job,
            self.workdir,
            base=base,
            extra=getattr(self.config, "extra_env", None) or {},
            payload_proxy=getattr(self.config, "payload_proxy", None),
        )

    # -- watching ------------------------------------------------------------------
    def watch(self, payload: PayloadProcess) -> Any:
        """Start watching a new payload process of the job; its monitor (None: unmonitored)."""
        self.monitors += 1
        self._fold(self.monitor)
        if not self.monitored:
            self.monitor = None
        elif self._factory is not None:
            self.monitor = self._factory(payload)
        else:
            self.monitor = JobMonitor(
                payload,
                self.workdir,
                self.limits,
                self.policy,
                self.interval,
                isolated=self.isolated,
                connections=self.connections,
                started=self.started,
            )
        if self.monitor is not None and self.monitors == 1:
            log.info("job %d: %s", self.job.panda_id, self.limits.describe())
        return self.monitor

    def _fold(self, monitor: Any) -> None:
        part = _part(monitor)
        if part is not None:
            self._earlier.append(part)

    def _parts(self) -> list[tuple[dict[str, int], int]]:
        part = _part(self.monitor)
        return [*self._earlier, part] if part is not None else list(self._earlier)

    def summary(self) -> dict[str, int]:
        """updateJob memory and I/O fields over every payload process of the job (an
        event-service payload may have been restarted); see :func:`merge_metrics`. CPU
        is left to the caller, which counts it per range."""
        return merge_metrics(self._parts())

    def weighed(self) -> tuple[dict[str, int], int]:
        """:meth:`summary` with the samples it stands on (its weight beside other
        guards', as rank 0 merges its droids')."""
        parts = self._parts()
        return merge_metrics(parts), sum(n for _, n in parts)

    def next_due(self) -> float:
        """Seconds until :meth:`check` has work (``inf`` when nothing is watched)."""
        return self.monitor.next_due() if self.monitor is not None else math.inf

    def check(self) -> PilotError | None:
        """The breach of the watched process, if any; its evidence is saved first."""
        if self.monitor is None:
            return None
        breach = self.monitor.check()
        if breach is not None:
            try:
                self.monitor.save_evidence()
            except OSError as exc:
                log.warning("monitor evidence not saved: %s", exc)
        return breach

    def progress(self) -> None:
        """The payload is waiting on the pilot, or just reported: not looping."""
        if self.monitor is not None and hasattr(self.monitor, "progress"):
            self.monitor.progress()

    @staticmethod
    def fatal(breach: PilotError) -> bool:
        """True if no new payload process can cure ``breach``."""
        return breach.code in FATAL_CODES

    # -- ending --------------------------------------------------------------------
    def kill(self, payload: PayloadProcess, breach: PilotError) -> KillRecord:
        """Kill the payload's whole tree for ``breach``."""
        log.critical("killing the payload: %s", breach.diag)
        record = payload.kill_tree(self.kill_grace, int(breach.code), breach.detail)
        log.info(
            "kill: signals %s to %s, survivors %s", record.signals, record.pids, record.survivors
        )
        return record

    def ended(self, payload: PayloadProcess | None) -> KillRecord | None:
        """After a payload process ended, or to end it: nothing of its tree is left (the
        orphans re-parented to init or to the pilot included), and its monitor's summary
        is written."""
        if payload is None:
            return None
        record = payload.clean_up(self.kill_grace)
        if record is not None and record.pids:
            log.warning("payload left processes behind: killed %s", record.pids)
        if self.monitor is not None and getattr(self.monitor, "payload", None) is payload:
            try:
                self.monitor.close()
            except OSError as exc:
                log.warning("monitor summary not written: %s", exc)
        return record

    def late_breach(self) -> PilotError | None:
        """A connection too short for any sample, found in the tracer's log at the end."""
        if not self.monitored:
            return None
        if self._factory is not None and hasattr(self.monitor, "connection_breach"):
            return self.monitor.connection_breach()
        return self.connections.update([], self._clock())

    def connections_report(self) -> str:
        """The job's outbound connections, for the log extracts ('' when none)."""
        return self.connections.report() if self.monitored else ""


def _part(monitor: Any) -> tuple[dict[str, int], int] | None:
    """A monitor's summary with its sample count, if it has one to give."""
    summary = getattr(monitor, "summary", None)
    got = summary() if summary is not None else None
    if not got:
        return None
    return got, int(getattr(monitor.sampler, "count", 1) or 1)


def merge_metrics(parts: Iterable[tuple[dict[str, int], int]]) -> dict[str, int]:
    """One set of updateJob memory and I/O fields from several (fields, samples): payload
    processes one after another, or droids side by side. The highest maxima, averages
    weighted by samples, totals summed; CPU is left out (it is counted per range)."""
    parts = [(got, n) for got, n in parts if got]
    if not parts:
        return {}
    out: dict[str, int] = {}
    weight = sum(n for _, n in parts) or 1
    for key in {k for got, _ in parts for k in got}:
        if key == "cpuConsumptionTime":
            continue
        values = [(got[key], n) for got, n in parts if key in got]
        if key.startswith("max"):
            out[key] = max(v for v, _ in values)
        elif key.startswith("avg"):
            out[key] = int(sum(v * n for v, n in values) / weight)
        else:
            out[key] = sum(v for v, _ in values)
    return out
