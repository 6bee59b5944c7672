"""The upstream a job is reported to, whatever it is.

A job's life (``pilot.workflow``) does not know whether it talks to a PanDA
server, to Harvester through shared files, or only to a local job file: it
calls an :class:`Upstream`. Each upstream owns its own durability: a final
update it cannot deliver now is kept on disk and delivered later, so the
workflow never has to retry.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Protocol

from pilot.fileio import atomic_write_json
from pilot.job import Job


class Upstream(Protocol):
    """Where job state goes. ``fields`` use PanDA's updateJob names."""

    def heartbeat(self, job: Job, fields: dict[str, Any]) -> str | None:
        """Send ``state=starting|running``; return the server's command (e.g. ``tobekilled``) or None."""
        ...

    def final_update(self, job: Job, fields: dict[str, Any]) -> bool:
        """Send the final ``finished``/``failed`` update; True if delivered now, False if kept for later."""
        ...


class LocalUpstream:
    """Upstream of ``pilot run --job-file``: records every update in the work directory.

    The final record (``final_update.json``) has the exact fields an
    updateJob call would carry, so it can be sent to a server later.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.heartbeats: list[dict[str, Any]] = []

    def heartbeat(self, job: Job, fields: dict[str, Any]) -> str | None:
        self.heartbeats.append(dict(fields))
        atomic_write_json(
            self.directory / "heartbeat.json", {**fields, "recorded": time.time()}, fsync=False
        )
        return None

    def final_update(self, job: Job, fields: dict[str, Any]) -> bool:
        atomic_write_json(self.directory / "final_update.json", fields, indent=1)
        return True
