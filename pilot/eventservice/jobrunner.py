"""The event-service step of a job's life, as the workflow calls it.

The workflow does not know where ranges come from; the command line picks
the source (the PanDA server or Harvester's files) and builds the runner
here, which turns the event-service loop's summary into what the final
update needs: nEvents, CPU, and the job's error code. A signal to the pilot
stops the loop, releases unstarted ranges (not charged as failures) and
fails the job with the signal's code.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from pilot.data.copytools import make_copytool
from pilot.errors import ErrorCode, PilotError, signal_code
from pilot.eventservice.loop import RangeSource, run_event_service
from pilot.eventservice.model import RangeResult
from pilot.job import Job
from pilot.monitor.connections import ConnectionWatch, connection_policy, network_isolated
from pilot.payload.command import payload_environment
from pilot.payload.secrets import job_secrets
from pilot.workflow import payload_container, wall_limit


class _Stop(Protocol):
    signum: int | None

    def is_set(self) -> bool: ...


def range_stage_out(job: Job, config: Any) -> Callable[[RangeResult], RangeResult] | None:
    """Send each finished range's output to the job's output storage before it is reported.

    A range counts as done only once its output is safely stored: a range
    reported finished whose file then dies with the node is an event lost.
    With the ``harvester`` copytool there is nothing to do: Harvester stages
    the file out from the dump, where it already is.
    """
    copytool = make_copytool(config.copytool, **config.copytool_options)
    if copytool.name == "harvester":
        return None  # the output was measured when collected; reading it again tells nothing
    base = (config.output_url or str(Path(config.workdir) / "storage")).rstrip("/")
    scope = (
        job.out_files[0].scope if job.out_files else (job.log_file.scope if job.log_file else "")
    )
    prefix = f"{base}/{scope}" if scope else base

    def put(result: RangeResult) -> RangeResult:
        if not result.output_path:
            return result
        src = Path(result.output_path)
        moved = copytool.put(src, f"{prefix}/{src.name}", timeout=config.stageout_timeout)
        if moved.adler32 != result.adler32 or moved.size != result.fsize:
            raise PilotError(
                ErrorCode.PUTADMISMATCH,
                f"{src.name}: stored {moved.size} bytes adler32 {moved.adler32}, "
                f"produced {result.fsize} bytes adler32 {result.adler32}",
            )
        return replace(result, output_path=moved.url or result.output_path)

    return put


def make_es_runner(
    source: RangeSource,
    reporter: Any,
    *,
    stage_out: Callable[[RangeResult], RangeResult] | None = None,
    zip_outputs: bool = False,
    range_timeout: float | None = None,
    report_interval: float = 30.0,
) -> Callable[..., dict[str, Any]]:
    """A workflow ``es_runner`` bound to one range source and reporter."""

    def _run(job: Job, workdir: Path, config: Any, stop: Any, hook: Any, deadline: Any) -> Any:
        return run_event_service(
            job,
            workdir,
            source,
            reporter,
            env=payload_environment(
                job, workdir, extra=config.extra_env, payload_proxy=config.payload_proxy
            ),
            range_timeout=range_timeout if range_timeout is not None else config.es_range_timeout,
            ready_timeout=config.es_ready_timeout,
            final_wait=config.es_final_wait,
            container=payload_container(job, config),
            connections=ConnectionWatch(
                workdir, connection_policy(config), isolated=network_isolated(config)
            ),
            report_interval=report_interval,
            deadline=deadline,
            stop_event=stop,  # type: ignore[arg-type]
            stage_out=hook,
            kill_grace=config.kill_grace,
            zip_outputs=zip_outputs,
        )

    def run(job: Job, workdir: Path, config: Any, stop: _Stop | None) -> dict[str, Any]:
        hook = stage_out if stage_out is not None else range_stage_out(job, config)
        limit = wall_limit(job, config)
        deadline = time.time() + limit if limit != float("inf") else None
        with job_secrets(workdir, job.raw):
            summary = _run(job, workdir, config, stop, hook, deadline)
        error = summary.error
        if stop is not None and stop.signum is not None:
            error = PilotError(signal_code(stop.signum), f"pilot received signal {stop.signum}")
        elif error is None and summary.error_code:
            error = PilotError(summary.error_code, "the event-service job got no event ranges")
        return {
            "nEvents": summary.n_events,
            "nRanges": summary.n_ranges,
            "finished": summary.n_finished,
            "failed": summary.n_failed,
            "fatal": summary.n_fatal,
            "released": len(summary.released),
            "delivered": summary.n_delivered,
            "undelivered": summary.n_undelivered,
            "restarts": summary.restarts,
            "metrics": {"cpuConsumptionTime": round(summary.cpu, 3)},
            "connections": summary.connections,
            "error": error,
        }

    return run
