"""One job's life on one node.

get job -> validate -> work directory -> stage-in -> payload under watch ->
diagnosis -> stage-out of outputs and log -> final update. Every step that can
fail raises a :class:`PilotError`; the first one decides the job's codes and
the remaining steps still run where they make sense (the log tarball is
staged out for a failed job too), so a job always ends in one final update.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

from pilot.comm.base import Upstream
from pilot.config import PilotConfig
from pilot.data.choice import copytool_for
from pilot.data.copytools import Copytool
from pilot.data.staging import TransferSink, output_destination, stage_in, stage_out
from pilot.data.traces import TraceSink, trace_sender
from pilot.errors import (
    ErrorCode,
    PilotError,
    diag_detail,
    diagnose_payload,
    error_diag,
    signal_code,
)
from pilot.fileio import atomic_write_json, tail
from pilot.job import Job
from pilot.monitor.watch import make_monitor
from pilot.payload.command import build_command
from pilot.payload.container import wrap
from pilot.payload.guard import Guard
from pilot.payload.runner import PayloadProcess
from pilot.payload.secrets import job_secrets
from pilot.report import (
    JOB_REPORT,
    PAYLOAD_STDERR,
    PAYLOAD_STDOUT,
    PILOT_LOG,
    CriticalLines,
    JobResult,
    final_update_fields,
    job_report,
    log_extracts,
    make_log_tarball,
)

log = logging.getLogger("pilot.workflow")

PILOT_SIGNALS = (signal.SIGTERM, signal.SIGQUIT, signal.SIGXCPU, signal.SIGUSR1, signal.SIGINT)


class StopSignal:
    """Signals sent to the pilot, handed to the job loop through a self-pipe.

    The handler only records the signal and writes one byte; the job loop,
    asleep in ``select`` on the payload and on this pipe, wakes at once and
    stops the payload itself, so the final update is always sent.
    """

    def __init__(self) -> None:
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        self.signum: int | None = None

    @property
    def fd(self) -> int:
        return self._r

    def trigger(self, signum: int, _frame: object = None) -> None:
        if self.signum is None:
            self.signum = signum
        try:
            os.write(self._w, b"!")
        except BlockingIOError:
            pass

    def install(self, signals: Iterable[int] = PILOT_SIGNALS) -> Callable[[], None]:
        """Install the handlers; returns a function that puts the old ones back."""
        old = {s: signal.signal(s, self.trigger) for s in signals}

        def restore() -> None:
            for s, handler in old.items():
                signal.signal(s, handler)

        return restore

    def is_set(self) -> bool:
        """Event-like view, for loops that poll rather than sleep on the pipe."""
        return self.signum is not None

    def close(self) -> None:
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass


class Monitor(Protocol):
    """What the job loop needs from the payload monitor (``pilot.monitor``)."""

    def next_due(self) -> float: ...

    def check(self) -> PilotError | None: ...

    def summary(self) -> dict[str, Any]: ...

    def evidence(self) -> str: ...

    def save_evidence(self) -> Path: ...

    def job_metrics(self) -> str: ...

    def connections_report(self) -> str: ...

    def connection_breach(self) -> PilotError | None: ...

    def close(self) -> None: ...


MonitorFactory = Callable[[PayloadProcess, Path, Job, PilotConfig], Monitor]
EventServiceRunner = Callable[[Job, Path, PilotConfig, "StopSignal | None"], dict[str, Any]]


def _attach_logging(workdir: Path) -> tuple[logging.Handler, CriticalLines]:
    root = logging.getLogger("pilot")
    file_handler = logging.FileHandler(workdir / PILOT_LOG, encoding="utf-8")
    file_handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)-8s %(name)s | %(message)s")
    )
    critical = CriticalLines()
    root.addHandler(file_handler)
    root.addHandler(critical)
    if root.level == logging.NOTSET or root.level > logging.INFO:
        root.setLevel(logging.INFO)
    return file_handler, critical


def _detach_logging(handlers: Iterable[logging.Handler]) -> None:
    root = logging.getLogger("pilot")
    for h in handlers:
        root.removeHandler(h)
        h.close()


def run_job(
    job: Job,
    config: PilotConfig,
    upstream: Upstream,
    *,
    stop: StopSignal | None = None,
    monitor_factory: MonitorFactory | None = None,
    es_runner: EventServiceRunner | None = None,
    transfer_sink: TransferSink | None = None,
    getjob_seconds: float = 0.0,
) -> JobResult:
    """Run one validated job to its final update; never raises a PilotError."""
    workdir = config.job_workdir(job.panda_id)
    result = JobResult(job=job, workdir=workdir)
    result.timings["getjob"] = getjob_seconds
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        result.fail(PilotError(ErrorCode.MKDIR, f"{workdir}: {exc}"))
        return _finish(result, config, upstream, critical=[str(exc)])
    handlers = _attach_logging(workdir)
    if transfer_sink is None:
        sender = trace_sender(config)
        transfer_sink = TraceSink(sender, job, local_site=config.site_name, pq=config.site_name)
    try:
        log.info("job %d: %s %s", job.panda_id, job.transformation, job.job_pars)
        _heartbeat(upstream, job, config, "starting")
        _run_steps(job, config, upstream, result, stop, monitor_factory, es_runner, transfer_sink)
    finally:
        if result.pilot_error_code:
            log.critical("job %d failed: %s", job.panda_id, result.pilot_error_diag)
        _detach_logging(handlers)
    return _finish(result, config, upstream, critical=list(handlers[1].lines))


def _run_steps(
    job: Job,
    config: PilotConfig,
    upstream: Upstream,
    result: JobResult,
    stop: StopSignal | None,
    monitor_factory: MonitorFactory | None,
    es_runner: EventServiceRunner | None,
    sink: TransferSink | None,
) -> None:
    workdir = result.workdir
    copytool = log_tool = None
    made: dict[str, Copytool] = {}
    try:
        reader = copytool_for(config, "pr", made)
        copytool = copytool_for(config, "pw", made)
        log_tool = copytool_for(config, "pl", made)
        t0 = time.monotonic()
        if job.in_files:
            stage_in(
                job,
                workdir,
                reader,
                config.input_url or ".",
                sink=sink,
                attempts=config.stage_attempts,
                timeout=config.stagein_timeout,
            )
        result.timings["stagein"] = time.monotonic() - t0
        _heartbeat(upstream, job, config, "running")
        t0 = time.monotonic()
        if job.event_service:
            if es_runner is None:
                raise PilotError(
                    ErrorCode.NOTIMPLEMENTED, "this pilot was started without event-service support"
                )
            summary = es_runner(job, workdir, config, stop)
            result.n_events = int(summary.get("nEvents", 0))
            result.metrics.update(summary.get("metrics", {}))
            # The summary's error is an object: the job report (JSON) gets its code and text.
            skip = ("metrics", "results", "error", "connections")
            extra = {k: v for k, v in summary.items() if k not in skip}
            if summary.get("connections"):
                result.extra["connections"] = summary["connections"]
            if summary.get("error") is not None:
                extra["error"] = {"code": summary["error"].code, "diag": summary["error"].diag}
            result.extra["eventService"] = extra
            if summary.get("error"):
                raise summary["error"]
        else:
            _run_payload(job, config, upstream, result, stop, monitor_factory)
        result.timings["payload"] = time.monotonic() - t0
    except PilotError as exc:
        result.fail(exc)
    t0 = time.monotonic()
    if result.pilot_error_code == 0 and result.exe_error_code == 0:
        result.state = "finished"
        try:
            if copytool is not None and job.out_files:
                for spec in job.out_files:
                    spec.guid = spec.guid or str(uuid.uuid4())
                stage_out(
                    job.out_files,
                    workdir,
                    copytool,
                    output_destination(config),
                    sink=sink,
                    attempts=config.stage_attempts,
                    timeout=config.stageout_timeout,
                )
                result.outputs.extend(job.out_files)
        except PilotError as exc:
            result.fail(exc)
    _stage_out_log(job, config, result, log_tool, sink)
    result.timings["stageout"] = time.monotonic() - t0


def _stage_out_log(
    job: Job,
    config: PilotConfig,
    result: JobResult,
    copytool: Copytool | None,
    sink: TransferSink | None,
) -> None:
    if job.log_file is None or copytool is None:
        return
    # the job report travels inside the log: write a provisional one first
    result.end_time = time.time()
    atomic_write_json(result.workdir / JOB_REPORT, job_report(result), indent=1, fsync=False)
    try:
        spec = make_log_tarball(job, result.workdir)
        if spec is None:
            return
        spec.guid = spec.guid or str(uuid.uuid4())
        stage_out(
            [spec],
            result.workdir,
            copytool,
            output_destination(config),
            sink=sink,
            attempts=config.stage_attempts,
        )
        result.outputs.append(spec)
    except PilotError as exc:
        log.error("log stage-out failed: %s", exc)
        result.fail(exc)


def _heartbeat(upstream: Upstream, job: Job, config: PilotConfig, state: str) -> str | None:
    fields = {
        "jobId": job.panda_id,
        "state": state,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()),
        "siteName": config.site_name,
        "node": config.node,
        "attemptNr": job.attempt_nr,
        "pilotID": config.pilot_id,
        "coreCount": job.core_count,
        "cpuConsumptionUnit": "s",
    }
    try:
        return upstream.heartbeat(job, fields)
    except PilotError as exc:  # a missed heartbeat is not a failed job
        log.warning("heartbeat failed: %s", exc)
        return None


def _run_payload(
    job: Job,
    config: PilotConfig,
    upstream: Upstream,
    result: JobResult,
    stop: StopSignal | None,
    monitor_factory: MonitorFactory | None,
) -> None:
    workdir = result.workdir
    command = build_command(
        job, workdir, env_extra=config.extra_env, payload_proxy=config.payload_proxy
    )
    (workdir / "payload.sh").write_text(f"#!/bin/sh\n{command.shell}\n", encoding="utf-8")
    log.info("payload: %s", command.shell)
    argv: list[str] | str = command.shell
    guard = _guard(job, workdir, config, monitor_factory)
    if guard.container is not None:
        argv = wrap(command.shell, workdir, guard.container)
        log.info("container: %s", " ".join(argv[:-1]))
    with job_secrets(workdir, job.raw):
        _watch_payload(job, config, upstream, result, stop, guard, command.env, argv)


def _guard(
    job: Job, workdir: Path, config: PilotConfig, monitor_factory: MonitorFactory | None
) -> Guard:
    """The job's guard rails; without a monitor factory the payload runs unmonitored, with
    one other than :func:`make_monitor` that one samples it (tests watch with their own)."""
    if monitor_factory is None or monitor_factory is make_monitor:
        return Guard(job, workdir, config, monitored=monitor_factory is not None)
    factory = monitor_factory
    return Guard(job, workdir, config, monitor_factory=lambda p: factory(p, workdir, job, config))


def _watch_payload(
    job: Job,
    config: PilotConfig,
    upstream: Upstream,
    result: JobResult,
    stop: StopSignal | None,
    guard: Guard,
    env: dict[str, str],
    argv: list[str] | str,
) -> None:
    workdir = result.workdir
    payload = PayloadProcess(
        argv,
        cwd=workdir,
        env=env,
        stdout=workdir / PAYLOAD_STDOUT,
        stderr=workdir / PAYLOAD_STDERR,
        shell=isinstance(argv, str),
    )
    monitor = guard.watch(payload)
    wake = [stop.fd] if stop else []
    next_heartbeat = time.monotonic() + config.heartbeat_interval
    killed: PilotError | None = None
    try:
        for _ in range(10_000_000):  # bounded; each turn sleeps until something is due
            now = time.monotonic()
            due = min(next_heartbeat, now + max(0.0, guard.next_due()))
            rc = payload.wait(timeout=max(0.05, min(due - now, 60.0)), wake_fds=wake)
            if rc is not None:
                break
            if stop is not None and stop.signum is not None:
                killed = PilotError(
                    signal_code(stop.signum), f"pilot received {signal.Signals(stop.signum).name}"
                )
            elif (breach := guard.check()) is not None:
                killed = breach
            elif time.monotonic() >= next_heartbeat:
                next_heartbeat = time.monotonic() + config.heartbeat_interval
                command_reply = _heartbeat(upstream, job, config, "running")
                if command_reply == "tobekilled":
                    killed = PilotError(
                        ErrorCode.PANDAKILL, "the server asked for the job to be killed"
                    )
            if killed is not None:
                guard.kill(payload, killed)
                break
    finally:
        # whatever ended it, nothing of the payload's tree is left behind (orphans too)
        guard.ended(payload)
        if monitor is not None:
            result.metrics.update(monitor.summary())
            result.metrics_text = monitor.job_metrics()
            report = monitor.connections_report()
            if report:
                result.extra["connections"] = report
            # A connection too short for any sample, found in the tracer's log at the end,
            # fails the job all the same.
            if killed is None and (late := guard.late_breach()) is not None:
                log.critical("%s", late.diag)
                killed = late
    if killed is not None:
        result.exe_error_code = result.trans_exit_code = payload.returncode or 0
        raise killed
    rc = payload.returncode if payload.returncode is not None else -1
    if "cpuConsumptionTime" not in result.metrics:
        result.metrics["cpuConsumptionTime"] = _children_cpu()
    diagnosis = diagnose_payload(
        rc, tail(workdir / PAYLOAD_STDERR, 8192), tail(workdir / PAYLOAD_STDOUT, 4096)
    )
    result.exe_error_code = diagnosis.exe_error_code
    result.trans_exit_code = diagnosis.trans_exit_code
    if not diagnosis.ok:
        result.exe_error_diag = diagnosis.pilot_error_diag
        raise PilotError(
            diagnosis.pilot_error_code,
            diag_detail(diagnosis.pilot_error_code, diagnosis.pilot_error_diag),
        )
    log.info("payload finished with exit code 0")


def _children_cpu() -> float:
    """CPU of reaped children of the pilot: a fallback when no monitor ran."""
    t = os.times()
    return round(t.children_user + t.children_system, 3)


def _finish(
    result: JobResult, config: PilotConfig, upstream: Upstream, critical: list[str]
) -> JobResult:
    result.end_time = time.time()
    if result.state != "finished" and not result.pilot_error_code:
        result.fail(PilotError(ErrorCode.UNKNOWNPAYLOADFAILURE, "job ended without a diagnosis"))
    if result.pilot_error_code and not result.pilot_error_diag:
        result.pilot_error_diag = error_diag(result.pilot_error_code)
    result.log_extracts = log_extracts(
        result.workdir, critical, str(result.extra.get("connections", "")), config.log_extract_chars
    )
    fields = final_update_fields(result, config.site_name, config.node, config.pilot_id)
    fields["metaData"] = json.dumps(job_report(result))
    try:
        if result.workdir.is_dir():
            atomic_write_json(result.workdir / JOB_REPORT, job_report(result), indent=1)
        delivered = upstream.final_update(result.job, fields)
    except PilotError as exc:
        delivered = False
        log.error("final update not delivered: %s", exc)
    result.extra["final_update_delivered"] = delivered
    return result
