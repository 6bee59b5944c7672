"""What the payloads of a ``pilot hpc`` rank run with: ``pilot run``'s configuration.

Every rank that starts payloads (a Droid's event-service payload, a whole job of a
ManyToOne worker) holds them to the same guard rails as ``pilot run``
(:class:`pilot.payload.guard.Guard`): the queue's description (``--queuedata-url``,
else the server of ``--url``, else ``$LOCAL_AGIS_SCHEDCONF``: its ``maxrss``,
``maxtime``, ``maxwdir``, ``looping_limit``, ``connection_policy``, container), the
job's own limits (``maxWalltime``, ``minRamCount``, ``maxCpuCount``, ``maxDiskCount``),
and the options that mean what they mean for ``pilot run``: ``--monitor-interval``,
``--kill-grace``, ``--connection-policy``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from pilot.config import PilotConfig, queue_settings
from pilot.monitor.connections import connection_policy
from pilot.payload.container import ContainerSpec


def add_options(p: argparse.ArgumentParser) -> None:
    """``pilot hpc``'s options for the payloads' guard rails (as ``pilot run``'s)."""
    p.add_argument(
        "--queuedata-url",
        default="",
        help="queue description (schedconfig JSON): URL or file (default with --url: the "
        "server's); its maxrss, maxtime, looping_limit, ... hold every payload",
    )
    p.add_argument(
        "--monitor-interval",
        type=float,
        default=60.0,
        metavar="S",
        help="payload sampling interval in seconds (memory, looping, disk, stdout)",
    )
    p.add_argument(
        "--kill-grace",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds between SIGTERM and SIGKILL of a payload's tree",
    )
    p.add_argument(
        "--connection-policy",
        default="",
        help="outbound connections of the payload: report (default), deny-all, or "
        "allow:HOST/NET[:PORT],...",
    )


def payload_config(args: Any, *, queue: Any = (), **overrides: Any) -> PilotConfig:
    """The :class:`PilotConfig` a rank's payloads run under (read once per rank).

    ``queue``, when given, is the queue description rank 0 read and sent in its
    CONFIG (a dict, or None for none): a Droid on a compute node without network
    then asks no server for it."""
    values: dict[str, Any] = dict(
        workdir=Path(args.workdir).resolve(),
        site_name=getattr(args, "queue", None) or "LOCAL",
        monitor_interval=float(getattr(args, "monitor_interval", 60.0)),
        kill_grace=float(getattr(args, "kill_grace", 10.0)),
        connection_policy=getattr(args, "connection_policy", "") or "",
    )
    if queue == ():
        values.update(
            queue_settings(
                getattr(args, "queue", None) or "LOCAL",
                queuedata_url=getattr(args, "queuedata_url", "") or "",
                server_url=getattr(args, "url", None) or None,
            )
        )
    elif queue:
        values.update(queue=dict(queue), container=ContainerSpec.from_queue(queue))
    values.update(overrides)
    config = PilotConfig(**values)
    connection_policy(config)  # a policy that cannot be read stops the rank now, clearly
    return config


def output_storage(args: argparse.Namespace) -> SimpleNamespace:
    """Where the ranks store files (the droids' range outputs, rank 0's log tarball), with
    ``pilot run``'s defaults: the ``copy`` copytool into ``WORKDIR/storage`` with
    ``--url``; with ``--harvester`` the outputs stay where they are and Harvester stages
    them out."""
    return SimpleNamespace(
        copytool=args.copytool or ("harvester" if args.harvester else "copy"),
        copytool_options={},
        output_url=args.output_url,
        workdir=str(Path(args.workdir).resolve()),
        stageout_timeout=3600.0,
    )
