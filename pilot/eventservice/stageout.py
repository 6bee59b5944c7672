"""Where a finished range's output goes before its result is reported.

A range counts as done only once its output is safely stored: the single-node
event service and every Droid store it through :func:`range_stage_out` (the
queue's copytool for ``es_events``) and turn a failed store into a failed
range (:func:`stored`).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from pilot.data.choice import copytool_for
from pilot.data.names import check_scope, storage_url
from pilot.data.staging import TransferEvent, output_destination
from pilot.data.traces import did_trace_sink
from pilot.errors import ErrorCode, PilotError
from pilot.eventservice.model import RangeResult, RangeStatus
from pilot.job import FileSpec, Job

log = logging.getLogger(__name__)


def stored(r: RangeResult, stage_out: Callable[[RangeResult], RangeResult]) -> RangeResult:
    """A finished range once ``stage_out`` stored its output. If that fails the range
    fails with the stage-out's error code (PanDA hands it to a later job): it is never
    reported finished with its output left on a worker node."""
    if r.status is not RangeStatus.FINISHED:
        return r
    try:
        return stage_out(r)
    except PilotError as exc:
        log.warning("range %s: stage-out failed: %s", r.event_range_id, exc)
        return RangeResult(
            r.event_range_id,
            RangeStatus.FAILED,
            cpu=r.cpu,
            wall=r.wall,
            error_code=int(exc.code),
            error_diag=exc.diag,
        )


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
    base = output_destination(config)
    first = job.out_files[0] if job.out_files else job.log_file
    scope = check_scope(first.scope if first else "", "output scope")
    by_did = getattr(copytool, "by_did", False)
    sink = did_trace_sink(copytool, config, job, local_site=getattr(config, "site_name", ""))

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
