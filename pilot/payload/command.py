"""Turn a job's ``transformation`` and ``jobPars`` into a command and its environment.

PanDA hands the pilot a transformation (a command, a script, or the URL
of a script) and one shell string of arguments; the PanDA pilot runs the
pair through a shell, and so does this one, so that quoting in ``jobPars``
means what the task's author meant.
"""

from __future__ import annotations

import os
import shlex
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import requests

from pilot.errors import ErrorCode, PilotError
from pilot.job import Job, check_lfn
from pilot.monitor.pytracer import tracer_env
from pilot.payload.secrets import job_credentials, scrub


@dataclass(frozen=True)
class PayloadCommand:
    shell: str
    env: dict[str, str]


def fetch_transformation(url: str, workdir: Path, timeout: float = 60.0) -> Path:
    """Download a transformation script given as a URL into the work directory."""
    name = check_lfn(url.rstrip("/").rsplit("/", 1)[-1] or "transformation", "transformation name")
    dest = workdir / name
    try:
        reply = requests.get(url, timeout=timeout)
        reply.raise_for_status()
    except requests.RequestException as exc:
        raise PilotError(ErrorCode.TRFDOWNLOADFAILURE, f"{url}: {exc}") from None
    dest.write_bytes(reply.content)
    try:
        dest.chmod(dest.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    except OSError as exc:
        raise PilotError(ErrorCode.CHMODTRF, f"{dest}: {exc}") from None
    return dest


def payload_environment(
    job: Job,
    workdir: Path,
    base: Mapping[str, str] | None = None,
    extra: Mapping[str, str] | None = None,
    *,
    trace: bool = True,
    payload_proxy: str | None = None,
) -> dict[str, str]:
    """The payload's environment: the pilot's without its credentials
    (:mod:`pilot.payload.secrets`), the connection tracer switched on for Python
    payloads (``trace``), the job's own credentials, and what PanDA payloads
    expect to find."""
    env = scrub(os.environ if base is None else base)
    if trace:
        env = tracer_env(workdir, env)
    env.update(job_credentials(workdir, payload_proxy))
    env.update(
        {
            "PandaID": str(job.panda_id),
            "PANDAID": str(job.panda_id),
            "JOBSETID": str(job.jobset_id),
            "TASKID": str(job.task_id),
            "ATHENA_PROC_NUMBER": str(job.core_count),
            "ATHENA_CORE_NUMBER": str(job.core_count),
            "PILOT_JOB_WORKDIR": str(workdir),
            "HOME": env.get("HOME", str(workdir)),
        }
    )
    if extra:
        env.update(extra)
    return env


def build_command(
    job: Job,
    workdir: Path,
    *,
    env_extra: Mapping[str, str] | None = None,
    fetch_timeout: float = 60.0,
    payload_proxy: str | None = None,
) -> PayloadCommand:
    trf = job.transformation
    if trf.startswith(("http://", "https://")):
        trf = "./" + fetch_transformation(trf, workdir, fetch_timeout).name
    elif "/" not in trf and (workdir / trf).is_file():
        trf = "./" + trf
    shell = f"{shlex.quote(trf) if ' ' not in trf else trf} {job.job_pars}".strip()
    env = payload_environment(job, workdir, extra=env_extra, payload_proxy=payload_proxy)
    return PayloadCommand(shell=shell, env=env)
