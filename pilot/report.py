"""What a job came to: the job report, the final-update fields, log extracts, log tarball.

The final update is built here and only here, with PanDA's updateJob field
names, so that the single-node pilot, Harvester mode and every Droid report
a job the same way.
"""

from __future__ import annotations

import json
import logging
import tarfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pilot.comm.pandaapi import panda_time
from pilot.errors import ErrorCode, PilotError, error_diag
from pilot.fileio import tail
from pilot.job import FileSpec, Job

PILOT_LOG = "pilot.log"
PAYLOAD_STDOUT = "payload.stdout"
PAYLOAD_STDERR = "payload.stderr"
JOB_REPORT = "pilot_job_report.json"


class CriticalLines(logging.Handler):
    """Keeps the pilot's own FATAL/CRITICAL log lines for the log extracts."""

    def __init__(self, keep: int = 20) -> None:
        super().__init__(level=logging.CRITICAL)
        self.lines: deque[str] = deque(maxlen=keep)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@dataclass
class JobResult:
    """Everything the pilot learned about one job."""

    job: Job
    workdir: Path
    state: str = "failed"  # finished | failed | holding
    pilot_error_code: int = 0
    pilot_error_diag: str = ""
    exe_error_code: int = 0
    exe_error_diag: str = ""
    trans_exit_code: int = 0
    start_time: float = field(default_factory=time.time)
    end_time: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)  # updateJob memory/IO/CPU fields
    metrics_text: str = ""  # extra jobMetrics pairs ("maxPSS=... readbyterate=...")
    n_events: int = 0
    outputs: list[FileSpec] = field(default_factory=list)
    log_extracts: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.state == "finished"

    def fail(self, error: PilotError) -> None:
        """Record the first failure; later ones (e.g. log stage-out) do not hide it."""
        if self.pilot_error_code:
            return
        self.state = "failed"
        self.pilot_error_code = int(error.code)
        self.pilot_error_diag = error_diag(error.code, error.detail)


def log_extracts(
    workdir: Path, critical: list[str], connections: str = "", limit: int = 1024
) -> str:
    """``pilotLog``: the pilot's critical lines, the connection report, the payload's stdout tail.

    The tail of stdout gets whatever room the first two leave, because the
    last lines a payload printed are what an operator reads first.
    """
    head = []
    if critical:
        head.append("pilot: " + "\n".join(critical))
    if connections:
        head.append(connections.strip())
    text = "\n".join(head)
    room = limit - len(text) - 1
    if room > 40:
        out_tail = tail(workdir / PAYLOAD_STDOUT, room * 2).strip()
        if out_tail:
            section = "payload stdout:\n" + out_tail[-(room - len("payload stdout:\n")) :]
            text = f"{text}\n{section}" if text else section
    return text[-limit:]


def make_log_tarball(job: Job, workdir: Path) -> FileSpec | None:
    """Tar the work directory (outputs and inputs excluded) as the job's log file."""
    spec = job.log_file
    if spec is None:
        return None
    skip = {f.lfn for f in job.in_files} | {f.lfn for f in job.out_files} | {spec.lfn}
    path = workdir / spec.lfn
    top = spec.lfn.removesuffix(".tgz").removesuffix(".tar.gz") or "log"
    try:
        with tarfile.open(path, "w:gz") as tar:
            for item in sorted(workdir.iterdir()):
                if item.name in skip or item.name.startswith("."):
                    continue
                if item.is_file() and not item.is_symlink():
                    tar.add(item, arcname=f"{top}/{item.name}")
                elif item.is_dir() and not item.is_symlink():
                    tar.add(item, arcname=f"{top}/{item.name}", recursive=True)
    except (OSError, tarfile.TarError) as exc:
        raise PilotError(ErrorCode.LOGFILECREATIONFAILURE, str(exc)) from None
    spec.local_path = str(path)
    return spec


def files_field(outputs: list[FileSpec]) -> str:
    """PanDA's ``xml`` field is in fact JSON: ``{lfn: {guid, fsize, adler32, surl}}``."""
    return json.dumps(
        {
            f.lfn: {
                "guid": f.guid,
                "fsize": f.fsize,
                "adler32": f.checksum.split(":", 1)[-1] if f.checksum else "",
                "surl": f.surl,
            }
            for f in outputs
            if f.status == "transferred"
        }
    )


def job_metrics(result: JobResult) -> str:
    pairs = {"coreCount": result.job.core_count}
    if result.n_events:
        pairs["nEvents"] = result.n_events
    extra = dict(kv.split("=", 1) for kv in result.metrics_text.split() if "=" in kv)
    for key in ("maxRSS", "maxPSS"):
        if key in result.metrics and key not in extra:
            pairs[key] = result.metrics[key]
    pairs.update(extra)
    return " ".join(f"{k}={v}" for k, v in pairs.items())


def final_update_fields(
    result: JobResult, config_site: str, node: str, pilot_id: str
) -> dict[str, Any]:
    """The updateJob fields of the final update, with PanDA's names.

    ``startTime``/``endTime`` are in PanDA's ``%Y-%m-%d %H:%M:%S`` (UTC): the
    server parses them with exactly that format and drops anything else, and
    Harvester passes the worker attributes on to it unchanged.
    """
    job = result.job
    timing = result.timings
    fields: dict[str, Any] = {
        "jobId": job.panda_id,
        "state": result.state,
        "timestamp": time.strftime(
            "%Y-%m-%dT%H:%M:%S", time.gmtime(result.end_time or time.time())
        ),
        "siteName": config_site,
        "node": node,
        "attemptNr": job.attempt_nr,
        "pilotID": pilot_id,
        "workdir": str(result.workdir),
        "startTime": panda_time(result.start_time),
        "endTime": panda_time(result.end_time or time.time()),
        "coreCount": job.core_count,
        "cpuConsumptionTime": int(round(float(result.metrics.get("cpuConsumptionTime", 0)))),
        "cpuConsumptionUnit": "s",
        "cpuConversionFactor": 1.0,
        "transExitCode": result.trans_exit_code,
        "exeErrorCode": result.exe_error_code,
        "exeErrorDiag": result.exe_error_diag[:256],
        "pilotErrorCode": result.pilot_error_code,
        "pilotErrorDiag": result.pilot_error_diag[:256],
        "pilotTiming": "|".join(
            str(int(round(timing.get(k, 0.0))))
            for k in ("getjob", "stagein", "payload", "stageout", "initialsetup", "setup")
        ),
        "pilotLog": result.log_extracts[:1024],
        "jobMetrics": job_metrics(result),
        "xml": files_field(result.outputs),
    }
    if result.n_events:
        fields["nEvents"] = result.n_events
    for key, value in result.metrics.items():
        if key != "cpuConsumptionTime":
            fields[key] = value
    return fields


def job_report(result: JobResult) -> dict[str, Any]:
    """The pilot's job report: what happened, file by file, step by step."""
    return {
        "PandaID": result.job.panda_id,
        "state": result.state,
        "pilotErrorCode": result.pilot_error_code,
        "pilotErrorDiag": result.pilot_error_diag,
        "exeErrorCode": result.exe_error_code,
        "exeErrorDiag": result.exe_error_diag,
        "transExitCode": result.trans_exit_code,
        "startTime": result.start_time,
        "endTime": result.end_time,
        "timings": {k: round(v, 3) for k, v in result.timings.items()},
        "metrics": result.metrics,
        "nEvents": result.n_events,
        "files": {
            "input": [
                {
                    "lfn": f.lfn,
                    "guid": f.guid,
                    "fsize": f.fsize,
                    "checksum": f.checksum,
                    "status": f.status,
                }
                for f in result.job.in_files
            ],
            "output": [
                {
                    "lfn": f.lfn,
                    "guid": f.guid,
                    "type": f.kind,
                    "fsize": f.fsize,
                    "adler32": f.checksum.split(":", 1)[-1] if f.checksum else "",
                    "surl": f.surl,
                    "status": f.status,
                }
                for f in result.outputs
            ],
        },
        **({"extra": result.extra} if result.extra else {}),
    }
