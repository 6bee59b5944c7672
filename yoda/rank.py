"""Rank 0 of ``pilot hpc``: Yoda with its upstream, journal and final job reports.

:mod:`pilot.ranks` parses the command line and calls :func:`run_yoda` on rank
0; this module builds what Yoda needs from those options: the range source
(the PanDA client for ``--url``, the Harvester files for ``--harvester``), the
upstream link process, the journal (opened or resumed under the durability
rule of docs/DESIGN.md, "Durability"), the job-state updates and the final
report ``pilot run`` would send, and Harvester's worker heartbeat.

Layout under the work directory: ``yoda.journal`` (the write-ahead journal)
and ``yoda.fetched`` (ranges the link read, synced before rank 0 is told).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import tarfile
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from hpc.payloadconfig import output_storage, payload_config
from hpc.transport import Transport
from pilot.errors import ErrorCode, PilotError, error_diag
from pilot.report import files_field
from yoda.journal import new_book, resume_book
from yoda.link import InlineLink, Link, ProcessLink, recover_fetched
from yoda.master import Yoda, YodaOptions
from yoda.scheduler import Policy, Scheduler

log = logging.getLogger("yoda.rank")
JOURNAL = "yoda.journal"
FETCHED = "yoda.fetched"  # ranges the upstream link read, written before rank 0 is told


def range_source(
    url: str = "",
    token: str | None = None,
    harvester: str = "",
    api: str = "auto",
    map_type: str = "auto",
    latency: float = 600.0,
) -> Any:
    """What hands out ranges and takes their results: the PanDA client for ``--url``, the
    Harvester files for ``--harvester``. Built in rank 0 and again in its upstream link.

    Harvester answers in minutes: the source waits a moment for an answer, then says
    "not yet" as an error, which rank 0 retries with backoff."""
    if url:
        from pilot.comm.panda import PandaClient, token_from_env

        token = token or token_from_env()
        return PandaClient(url, token=token, retries=2, timeout=(5.0, 30.0), api=api)
    from pilot.comm.harvester import HarvesterAccessPoint, HarvesterEventSource

    return HarvesterEventSource(
        HarvesterAccessPoint(harvester, map_type=map_type),
        block=2.0,
        latency=latency,
        pending_is_error=True,
    )


def hpc_token(args: argparse.Namespace) -> str | None:
    """``--token``, else the file ``--token-file`` names (PilotError when unreadable)."""
    if args.token or not getattr(args, "token_file", None):
        return args.token
    from pilot.comm.panda import read_token_file

    token = read_token_file(args.token_file)
    if token is None:
        raise PilotError(ErrorCode.NOPROXY, f"no token in --token-file {args.token_file}")
    return token


def make_link(args: argparse.Namespace, upstream: Any) -> Link:
    """The upstream in a process of its own (see :mod:`yoda.link`); in this one if that fails."""
    spec = {
        "factory": "yoda.rank:range_source",
        "kwargs": {
            "url": args.url or "",
            "token": hpc_token(args),
            "harvester": args.harvester or "",
            "api": args.panda_api,
            "map_type": args.harvester_map_type,
            "latency": args.harvester_latency,
        },
        "log": str(Path(args.workdir) / "logs" / "link.log"),
        "fetched": str(Path(args.workdir) / FETCHED),
    }
    try:
        return ProcessLink(spec)
    except (PilotError, OSError) as exc:
        log.warning("upstream link process failed (%s): calling the upstream from rank 0", exc)
        return InlineLink(upstream)


def make_upstream(args: argparse.Namespace) -> tuple[Any, Any]:
    """(range source, job getter) for ``--url`` or ``--harvester``."""
    if args.url:
        if not args.queue:
            raise PilotError(ErrorCode.NOTDEFINED, "--url needs --queue")
        client = range_source(url=args.url, token=hpc_token(args), api=args.panda_api)

        def jobs() -> list[dict[str, Any]]:
            out = []
            for _ in range(max(1, args.jobs)):
                job = client.get_job(args.queue, prodSourceLabel="managed")
                if job is None:
                    break
                out.append(job)
            return out

        return client, jobs
    source = range_source(
        harvester=args.harvester,
        map_type=args.harvester_map_type,
        latency=args.harvester_latency,
    )

    def harvester_jobs() -> list[dict[str, Any]]:
        return harvester_worker_jobs(source.ap)

    return source, harvester_jobs


def harvester_worker_jobs(ap: Any) -> list[dict[str, Any]]:
    """The event-service jobs rank 0 runs from the access point.

    Jobs that cannot run here fail at once with their codes in their own
    attributes: invalid specs; event-service jobs of a ManyToOne worker, which
    Harvester never feeds ranges. (Ordinary jobs go to :mod:`pilot.wholejobs`.)
    """
    found = ap.scan_jobs().runnable(ap.many_jobs)
    failed = found.failed
    jobs = [job.raw for job in found.jobs]
    for pid, exc in failed.items():
        log.error("job %s cannot run: %s", pid or "?", exc)
    if failed:
        import socket

        ap.fail_worker(failed, node=socket.gethostname(), kill=not jobs)
    return jobs


def harvester_job_update(access_point: Any, context: Any = None) -> Any:
    """Job states for Harvester: ``worker_attributes.json`` (at the top of a OneToOne
    worker's access point) and, at the end, what ``pilot run`` leaves there.

    Harvester reads a job's state from its worker attributes; rank 0 writes
    them as the PanDA client would send updateJob, and Harvester reports
    them to PanDA itself. A final state comes with the fields of ``pilot
    run``'s final update (node, site, start and end times in PanDA's
    format, cores, CPU of the droids' payloads), the job report, and the
    log tarball of the ranks' logs in the stage-out dump.
    """
    from pilot.comm.harvester import HarvesterUpstream

    upstream = HarvesterUpstream(access_point, finish_worker=False)

    def update(fields: dict[str, Any]) -> None:
        job = SimpleNamespace(panda_id=int(fields["jobId"]))
        if fields.get("state") in ("finished", "failed") and context is not None:
            final_job, full = context.final(dict(fields))
            if upstream.final_update(final_job, full):
                return
            raise PilotError(ErrorCode.FILEHANDLINGFAILURE, "final attributes not written")
        upstream.heartbeat(job, fields)  # type: ignore[arg-type]

    return update


class FinalReport:
    """What rank 0 knows of an event-service job at its end, as ``pilot run`` reports it."""

    def __init__(self, args: argparse.Namespace, jobs: dict[int, dict[str, Any]]) -> None:
        import socket

        self.args = args
        self.jobs = jobs
        self.start = time.time()
        self.node = socket.gethostname()
        self.pilot_id = f"{self.node}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.yoda: Yoda | None = None

    def _cpu(self, panda_id: int) -> float:
        """The job's shares of the droids' payload CPU, as each droid told them with BYE."""
        if self.yoda is None:
            return 0.0
        return float(sum(d.job_cpu.get(panda_id, 0.0) for d in self.yoda.s.droids.values()))

    def _metrics(self, panda_id: int) -> dict[str, int]:
        """The job's memory and I/O fields over every droid that ran it."""
        from pilot.payload.guard import merge_metrics

        if self.yoda is None:
            return {}
        return merge_metrics(
            d.metrics[panda_id] for d in self.yoda.s.droids.values() if panda_id in d.metrics
        )

    def panda_update(self, fields: dict[str, Any]) -> dict[str, Any]:
        """updateJob fields for a PanDA server: a final state with the fields ``pilot run``
        sends (node, site, times in PanDA's format, cores, CPU, the droids' memory and
        I/O figures), anything else as it is."""
        from pilot.comm.pandaapi import panda_time

        if fields.get("state") not in ("finished", "failed"):
            return fields
        job, full = self.final(fields)
        full["startTime"] = panda_time(full["startTime"])
        full["endTime"] = panda_time(full["endTime"])
        spec = getattr(job, "log_file", None)
        if spec is not None and not spec.local_path:  # the tarball could not be made
            code = ErrorCode.LOGFILECREATIONFAILURE
            full.update(state="failed", pilotErrorCode=int(code), pilotErrorDiag=error_diag(code))
        elif spec is not None:
            # PanDA's Adder fails a job whose log it cannot find in the final update
            try:
                self._store(job, spec)
            except PilotError as exc:
                log.error("log stage-out failed: %s", exc)
                full.update(
                    state="failed", pilotErrorCode=int(exc.code), pilotErrorDiag=exc.diag[:256]
                )
            else:
                full["xml"] = files_field([spec])
        return full

    def _store(self, job: Any, spec: Any) -> None:
        """The log tarball to the output storage, as ``pilot run`` stores a job's log:
        through Rucio (its DID, the job's log dataset and RSE) with a trace, or copied."""
        from pilot.data.choice import copytool_for
        from pilot.data.staging import output_destination, stage_out
        from pilot.data.traces import did_trace_sink

        storage = output_storage(self.args)
        tool = copytool_for(storage, "pl")
        sink = did_trace_sink(tool, storage, job, local_site=self.args.queue or "")
        stage_out(
            [spec],
            Path(self.args.workdir),
            tool,
            output_destination(storage),
            sink=sink,
            attempts=2,
        )

    def final(self, fields: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        """The job and its final fields for Harvester, with the log tarball made."""
        job, full = self._fields(fields)
        log_spec = getattr(job, "log_file", None)
        if log_spec is not None:
            try:
                self._log_tarball(log_spec)
            except (OSError, tarfile.TarError) as exc:
                log.error("log tarball not made: %s", exc)
                log_spec.local_path = ""
        return job, full

    def _fields(self, fields: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        from pilot.job import Job

        panda_id = int(fields["jobId"])
        raw = self.jobs.get(panda_id, {"PandaID": panda_id, "transformation": "?"})
        try:
            job = Job.from_panda(raw)
        except PilotError:
            job = SimpleNamespace(panda_id=panda_id, all_outputs=[], log_file=None)
        end = time.time()
        ranks = (self.yoda.t.size - 1) if self.yoda is not None else 0
        full = {
            "siteName": self.args.queue or "LOCAL",
            "node": self.node,
            "pilotID": self.pilot_id,
            "startTime": round(self.start, 3),
            "endTime": round(end, 3),
            "coreCount": max(1, ranks * max(1, self.args.slots)),
            "cpuConsumptionTime": int(round(self._cpu(panda_id))),
            "cpuConsumptionUnit": "s",
            "cpuConversionFactor": 1.0,
            "pilotErrorCode": 0,
            "pilotErrorDiag": "",
            "exeErrorCode": 0,
            "exeErrorDiag": "",
            "transExitCode": 0,
            **self._metrics(panda_id),
            **fields,
        }
        if str(full.get("attemptNr", "")).isdigit():
            full["attemptNr"] = int(full["attemptNr"])
        report = {
            "PandaID": panda_id,
            "state": full["state"],
            "pilotErrorCode": full["pilotErrorCode"],
            "pilotErrorDiag": full["pilotErrorDiag"],
            "startTime": self.start,
            "endTime": end,
            "nEvents": full.get("nEvents", 0),
            "ranks": ranks,
            "reported": self.yoda.reported if self.yoda is not None else 0,
        }
        full["metaData"] = json.dumps(report)
        return job, full

    def _log_tarball(self, spec: Any) -> None:
        """The ranks' logs and each payload's own logs, without the range outputs."""
        from pilot.data.checksum import adler32_file

        work = Path(self.args.workdir)
        path = work / spec.lfn
        top = spec.lfn.removesuffix(".tgz").removesuffix(".tar.gz") or "log"
        with tarfile.open(path, "w:gz") as tar:
            for item in sorted(work.rglob("*")):
                rel = item.relative_to(work)
                if not item.is_file() or item.is_symlink() or item == path:
                    continue
                if "outputs" in rel.parts or item.suffix not in (".log", ".txt", ".json"):
                    continue
                if item.stat().st_size > 50 * 2**20:
                    continue
                tar.add(item, arcname=f"{top}/{rel}")
        spec.local_path = str(path)
        spec.fsize = path.stat().st_size
        spec.checksum = f"ad:{adler32_file(path)}"
        spec.guid = spec.guid or str(uuid.uuid4())


def run_yoda(args: argparse.Namespace, transport: Transport) -> int:
    workdir = Path(args.workdir)
    upstream, get_jobs = make_upstream(args)
    path = workdir / JOURNAL
    if args.resume and path.exists():
        book, epoch = resume_book(path, group=True)  # Yoda commits before it sends
        log.info("resumed from %s: epoch %d, %d ranges", path, epoch, book.ledger.n)
        recovered = recover_fetched(book, workdir / FETCHED)
        if recovered:
            log.warning("%d ranges fetched before the crash but never journaled: added", recovered)
    else:
        if path.exists():
            raise PilotError(
                ErrorCode.FILEEXISTS, f"{path} exists: use --resume, or another --workdir"
            )
        book, epoch = new_book(path)
        (workdir / FETCHED).unlink(missing_ok=True)
    if not book.jobs:
        for job in get_jobs():
            book.add_job(job)
        if not book.jobs:
            log.error("no job from the upstream")
    policy = Policy(
        lease_s=args.lease,
        hb_interval=args.hb_interval,
        hb_timeout=args.hb_timeout,
        walltime_end=args.walltime_end,
        drain_lead=args.drain_lead,
        term_grace=args.term_grace,
        # the droid's own lease check (the executor's range timeout) must win the race
        lease_grace=2 * args.hb_interval + 5,
    )
    options = YodaOptions(retry_max=args.retry_max)
    # updateJob with --url; worker attributes for Harvester with --harvester
    report = FinalReport(args, {int(j.get("PandaID", 0) or 0): j for j in book.jobs})
    if hasattr(upstream, "update_job"):
        update_job = upstream.update_job

        def job_update(fields: dict[str, Any]) -> Any:
            return update_job(report.panda_update(fields))
    else:
        job_update = harvester_job_update(upstream.ap, report)
    # the queue's description, read here once: the droids get it with their CONFIG
    # (compute nodes may have no network to read it themselves)
    queue = payload_config(args).queue if args.executor != "null" else None
    yoda = Yoda(
        transport,
        upstream,
        Scheduler(book, policy, epoch=epoch, queue=queue, started=time.time()),
        options,
        job_update=job_update,
        link=make_link(args, upstream),
    )
    report.yoda = yoda
    if not book.jobs:
        yoda.s.exhausted = True
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda signum, frame: yoda.request_drain())
    try:
        with _heartbeat(args, upstream, yoda):
            rc = yoda.run()
            if args.harvester and rc == 0:
                # Every result is with Harvester and this worker ends (drained or
                # done): a job not yet final gets its final state now, or Harvester
                # would see it running in a worker that is gone.
                yoda.report_jobs(final=True, worker_end=True)
    finally:
        if book.journal is not None:
            book.journal.close()
    if args.harvester and rc == 0:
        # the worker is done (Harvester's kill_worker.json)
        upstream.ap.request_kill("all ranges reported")
    return rc


def _heartbeat(args: argparse.Namespace, upstream: Any, yoda: Yoda) -> Any:
    """With ``--harvester``: rank 0 keeps ``worker_heartbeat.json`` fresh while ranges run
    (Harvester kills a worker whose heartbeat is too old)."""
    if not args.harvester:
        return contextlib.nullcontext()
    from pilot.comm.harvester import WorkerHeartbeat

    return WorkerHeartbeat(
        upstream.ap,
        args.harvester_heartbeat,
        info=lambda: {"ranks": yoda.t.size, "reported": yoda.reported},
    )
