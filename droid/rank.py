"""The ranks > 0 of ``pilot hpc``: a Droid with its executor and output storage.

:mod:`pilot.ranks` parses the command line and calls :func:`run_droid` on
every rank but 0. Work directories: ``droid<rank>/<PandaID>/`` with the
outputs renamed into ``droid<rank>/<PandaID>/outputs/`` when complete.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
from pathlib import Path

from droid.droid import Droid, DroidOptions
from droid.executors import event_executor
from droid.nullexec import NullExecutor
from hpc.payloadconfig import output_storage, payload_config
from hpc.transport import Transport
from pilot.config import PilotConfig

log = logging.getLogger("droid.rank")


def run_droid(args: argparse.Namespace, transport: Transport) -> int:
    workdir = Path(args.workdir) / f"droid{transport.rank}"
    if args.executor == "null":

        def factory(job, wd, slots, lease_s):
            return NullExecutor(job, wd, slots, write_outputs=True)

    else:
        # the guard rails of pilot run (pilot.payload.guard), with the queue's settings
        # as rank 0 read them and sent them in its CONFIG: a compute node may have no
        # network, so no droid asks a server (a policy that cannot be read stops the
        # rank here, before any range)
        base = payload_config(args, queue=None)
        storage = output_storage(args)
        configs: dict[str, PilotConfig] = {}

        def factory(job, wd, slots, lease_s):
            config = configs.get("queue")
            if config is None:  # once CONFIG came: with rank 0's queue, if it had one
                queue = droid.queuedata
                config = payload_config(args, queue=queue) if queue else base
                configs["queue"] = config
            return event_executor(
                job, wd, slots, lease_s, storage=storage, config=config, started=droid.started
            )

    droid = Droid(transport, workdir, factory, DroidOptions(slots=max(1, args.slots)))

    # The batch system signals every rank; Yoda's DRAIN follows. Until then the
    # droid takes nothing new and finishes what runs.
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda signum, frame: droid.request_drain())
    rc = droid.run()
    if droid.yoda_dead:
        # Not the normal path: with rank 0 gone, MPI_Finalize may wait for it forever.
        # The payloads are stopped and the results are Yoda's journal's business now.
        log.error("leaving without MPI_Finalize: rank 0 is dead")
        logging.shutdown()
        os._exit(3)
    return rc
