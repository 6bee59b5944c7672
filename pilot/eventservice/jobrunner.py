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
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from pilot.data.choice import copytool_for
from pilot.data.names import check_scope, storage_url
from pilot.data.staging import TransferEvent
from pilot.data.traces import TraceSink, trace_sender
from pilot.errors import ErrorCode, PilotError, signal_code
from pilot.eventservice.loop import RangeSource, run_event_service
from pilot.eventservice.model import RangeResult
from pilot.job import FileSpec, Job
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
    the file out from the dump, where it already is. The copytool is the
    queue's for ``es_events`` (or ``--copytool``); with ``rucio`` each output
    is uploaded to the job's ddmEndPointOut, registered with a new GUID in the
    job's output dataset, and traced like the job's own files.
    """
    copytool = copytool_for(config, "es_events")
    if copytool.name == "harvester":
        return None  # the output was measured when collected; reading it again tells nothing
    base = config.output_url or str(Path(config.workdir) / "storage")
    first = job.out_files[0] if job.out_files else job.log_file
    scope = check_scope(first.scope if first else "", "output scope")
    by_did = getattr(copytool, "by_did", False)
    sink = None
    if by_did:
        sender = trace_sender(config)
        if sender.url:
            sink = TraceSink(sender, job, local_site=getattr(config, "site_name", ""))

    def put(result: RangeResult) -> RangeResult:
        if not result.output_path:
            return result
        src = Path(result.output_path)
        if by_did:
            spec = FileSpec(
                src.name,
                "output",
                guid=str(uuid.uuid4()),
                scope=scope,
                dataset=first.dataset if first else "",
                ddm_endpoint=first.ddm_endpoint if first else "",
                destination_dblock=first.destination_dblock if first else "",
            )
            moved = _traced_put(copytool, spec, src, config.stageout_timeout, sink)
        else:
            url = storage_url(base, scope, src.name)
            moved = copytool.put(src, url, timeout=config.stageout_timeout)
        if moved.adler32 != result.adler32 or moved.size != result.fsize:
            raise PilotError(
                ErrorCode.PUTADMISMATCH,
                f"{src.name}: stored {moved.size} bytes adler32 {moved.adler32}, "
                f"produced {result.fsize} bytes adler32 {result.adler32}",
            )
        return replace(result, output_path=moved.url or result.output_path)

    return put


def _traced_put(copytool: Any, spec: FileSpec, src: Path, timeout: float, sink: Any) -> Any:
    """One range output through a DID copytool, with its transfer event traced."""
    event = TransferEvent("put", spec, "", copytool.name, "INIT_REPORT", time_start=time.time())
    event.transfer_start = time.time()
    try:
        moved = copytool.put_did(spec, src, timeout=timeout)
    except PilotError as exc:
        event.state, event.reason, event.time_end = "STAGEOUT_ATTEMPT_FAILED", exc.diag, time.time()
        event.remote_site = spec.ddm_endpoint
        if sink is not None:
            sink(event)
        raise
    event.state, event.size, event.time_end = "DONE", moved.size, time.time()
    event.remote_site, event.url = moved.rse, moved.url
    if sink is not None:
        sink(event)
    return moved


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

    def run(job: Job, workdir: Path, config: Any, stop: _Stop | None) -> dict[str, Any]:
        hook = stage_out if stage_out is not None else range_stage_out(job, config)
        limit = wall_limit(job, config)
        deadline = time.time() + limit if limit != float("inf") else None
        policy = connection_policy(config)  # host names in an allow-list resolve once
        lease = range_timeout if range_timeout is not None else config.es_range_timeout
        with job_secrets(workdir, job.raw):
            summary = run_event_service(
                job,
                workdir,
                source,
                reporter,
                env=payload_environment(
                    job, workdir, extra=config.extra_env, payload_proxy=config.payload_proxy
                ),
                range_timeout=lease,
                ready_timeout=config.es_ready_timeout,
                final_wait=config.es_final_wait,
                container=payload_container(job, config),
                connections=ConnectionWatch(
                    workdir, policy, isolated=network_isolated(config, policy)
                ),
                report_interval=report_interval,
                deadline=deadline,
                stop_event=stop,  # type: ignore[arg-type]
                stage_out=hook,
                kill_grace=config.kill_grace,
                zip_outputs=zip_outputs,
            )
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
