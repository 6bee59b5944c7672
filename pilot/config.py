"""The pilot's configuration, decided once at start.

Everything that depends on the command line, the queue description or the
environment is read here into one frozen object and passed down; nothing
deeper in the pilot looks at ``os.environ`` to change its behaviour.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pilot.payload.container import ContainerSpec


@dataclass(frozen=True)
class PilotConfig:
    """How this pilot runs jobs. Times in seconds, sizes in MB unless named otherwise."""

    workdir: Path = Path("pilot-work")
    site_name: str = "LOCAL"
    node: str = field(default_factory=socket.gethostname)
    pilot_id: str = field(
        default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    )
    # storage: where inputs are read from and outputs written to (URL or path)
    input_url: str = ""
    output_url: str = ""
    # "" = the queue's acopytools/copytools, else copy (pilot.data.choice)
    copytool: str = ""
    copytool_options: dict[str, Any] = field(default_factory=dict)
    rucio: Any = None  # pilot.data.rucio.RucioSettings, read once when a copytool needs it
    stage_attempts: int = 2
    stagein_timeout: float = 3600.0
    stageout_timeout: float = 3600.0
    trace_url: str = ""
    # payload supervision
    heartbeat_interval: float = 1800.0
    monitor_interval: float = 60.0
    kill_grace: float = 10.0
    # queue description (schedconfig), already parsed
    queue: dict[str, Any] = field(default_factory=dict)
    # log extracts sent with the final update (PanDA keeps 1024 characters)
    log_extract_chars: int = 1024
    keep_workdir: bool = True
    extra_env: dict[str, str] = field(default_factory=dict)
    # outbound connections of the payload: "report", "deny-all", or an allow-list
    # (see pilot.monitor.connections.ConnectionPolicy.from_spec)
    connection_policy: str = ""
    # all monitor limits times this factor (tests shrink hours to seconds)
    limit_scale: float = 1.0
    # user containers: None runs payloads on the host
    container: ContainerSpec | None = None
    # event service: how long an AthenaMP-style payload may take to ask for its first
    # range, to report one it holds (None: no limit but the job's walltime), and to
    # send its last reports after "No more events" (pilot.eventservice.executor)
    es_ready_timeout: float = 1800.0
    es_range_timeout: float | None = None
    es_final_wait: float = 1800.0
    # a proxy meant for payloads (copied into each job's work directory); the pilot's
    # own credentials never reach a payload (pilot.payload.secrets)
    payload_proxy: str | None = None
    # files holding the pilot's own credentials that its environment does not name
    # (--token-file): covered in the payload's container like the rest
    secret_files: tuple[str, ...] = ()

    def job_workdir(self, panda_id: int) -> Path:
        return self.workdir / f"PandaJob_{panda_id}"


def queue_settings(
    site: str, *, queuedata_url: str = "", server_url: str | None = None
) -> dict[str, Any]:
    """The queue description's part of a :class:`PilotConfig` (``queue`` and ``container``),
    as ``--queuedata-url`` (or the server the pilot pulls from, or
    ``$LOCAL_AGIS_SCHEDCONF``) gives it; nothing when no description was asked for or
    served. Every mode of ``pilot run`` and every rank of ``pilot hpc`` that runs payloads
    takes it from here."""
    from pilot.queue import resolve_queue  # noqa: PLC0415

    if not (queuedata_url or server_url or os.environ.get("LOCAL_AGIS_SCHEDCONF")):
        return {}
    queue = resolve_queue(site, queuedata_url=queuedata_url or None, server_url=server_url)
    queue_dict = queue.to_dict()
    return {"queue": queue_dict, "container": ContainerSpec.from_queue(queue_dict)}
