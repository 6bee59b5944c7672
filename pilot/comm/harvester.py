"""Harvester's shared-file messenger, the pilot's side.

Harvester drives pilots through JSON files in the worker's access-point
directory (push mode, ARC CEs, HPC). This module alone knows the file names:
:class:`HarvesterFiles` holds Harvester's defaults, and a site that renamed
one in its ``[payload_interaction]`` configuration overrides that field.

Layout: one job per worker keeps every file in the access point. With many
jobs per worker (HPC), the per-job files (:data:`PER_JOB_FILES`) live in
``<access point>/<PandaID>/`` while the job spec, the PandaID list, the job
request, the heartbeat and the kill file stay at the top.

Writing: every file is written atomically (temp file + rename). The two files
Harvester consumes by renaming (``event_status.dump.json`` and
``worker_updateevents.json``: ``X`` -> ``X.read`` -> ``X.read.<time>``) are
never overwritten while pending: the pilot first renames a pending ``X`` to a
private name (so Harvester cannot take it half-merged), merges the new entries
into it and writes ``X`` back; a crash in between leaves the private file,
merged on the next write. ``X.read`` is Harvester's and is left alone.

Reading: a missing, truncated or garbage file raises :class:`PilotError`
with a clear code; waiting callers retry with backoff, bounded in time.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from pilot.errors import ErrorCode, PilotError
from pilot.eventservice.model import RangeResult, RangeStatus
from pilot.fileio import atomic_write_json, read_json
from pilot.job import Job

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HarvesterFiles:
    """File names in the access point; the defaults are Harvester's."""

    job_request: str = "worker_requestjob.json"
    job_spec: str = "HPCJobs.json"
    job_spec_alt: str = "pandaJobData.out"
    pandaids: str = "worker_pandaids.json"
    pool_file_catalog: str = "PoolFileCatalog_H.xml"
    event_request: str = "worker_requestevents.json"
    event_ranges: str = "JobsEventRanges.json"
    event_status_dump: str = "event_status.dump.json"
    update_events: str = "worker_updateevents.json"
    worker_attributes: str = "worker_attributes.json"
    job_report: str = "jobReport.json"
    heartbeat: str = "worker_heartbeat.json"
    kill_worker: str = "kill_worker.json"

    @classmethod
    def with_overrides(cls, overrides: dict[str, str] | None) -> HarvesterFiles:
        known = {f.name for f in fields(cls)}
        bad = set(overrides or {}) - known
        if bad:
            raise PilotError(ErrorCode.NOTDEFINED, f"unknown Harvester file keys {sorted(bad)}")
        return cls(**(overrides or {}))


PER_JOB_FILES = frozenset(
    {
        "event_request",
        "event_ranges",
        "event_status_dump",
        "update_events",
        "worker_attributes",
        "job_report",
    }
)

# Fields of the final update that do not belong in worker_attributes.json.
_NOT_ATTRIBUTES = frozenset({"xml", "metaData", "state", "jobId"})


def _merge(old: Any, new: dict[str, list]) -> dict[str, list]:
    merged: dict[str, list] = {}
    if isinstance(old, dict):
        for key, value in old.items():
            merged[str(key)] = list(value) if isinstance(value, list) else [value]
    for key, value in new.items():
        merged.setdefault(str(key), []).extend(value)
    return merged


class HarvesterAccessPoint:
    """The access-point directory of one worker."""

    def __init__(
        self, root: str | Path, files: HarvesterFiles | None = None, *, many_jobs: bool = False
    ) -> None:
        self.root = Path(root)
        self.files = files or HarvesterFiles()
        self.many_jobs = many_jobs

    def path(self, key: str, panda_id: int | None = None) -> Path:
        name = getattr(self.files, key)
        if self.many_jobs and key in PER_JOB_FILES:
            if panda_id is None:
                raise PilotError(ErrorCode.NOTDEFINED, f"{name} needs a PandaID in many-jobs mode")
            return self.root / str(int(panda_id)) / name
        return self.root / name

    # -- jobs ----------------------------------------------------------------
    def read_job_definitions(self) -> dict[int, dict[str, Any]]:
        """``{PandaID: job definition}`` from the job spec file (or its alternative name)."""
        for key in ("job_spec", "job_spec_alt"):
            path = self.path(key)
            if path.exists():
                data = read_json(path)
                break
        else:
            raise PilotError(
                ErrorCode.NOSUCHFILE,
                f"no job spec file ({self.files.job_spec} or {self.files.job_spec_alt}) in {self.root}",
            )
        if isinstance(data, dict) and "PandaID" in data:
            data = {str(data["PandaID"]): data}
        if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
            raise PilotError(
                ErrorCode.CONVERSIONFAILURE, f"{path} is not a {{PandaID: job definition}} object"
            )
        out: dict[int, dict[str, Any]] = {}
        for key, value in data.items():
            try:
                out[int(key)] = value
            except ValueError:
                raise PilotError(
                    ErrorCode.CONVERSIONFAILURE, f"{path}: PandaID {key!r} is not a number"
                ) from None
        return out

    def read_jobs(self) -> list[Job]:
        return [Job.from_panda(d) for d in self.read_job_definitions().values()]

    def worker_jobs(self) -> list[Job]:
        """The jobs fed to this worker: those of ``worker_pandaids.json`` when present, else all."""
        definitions = self.read_job_definitions()
        if not self.path("pandaids").exists():
            return [Job.from_panda(d) for d in definitions.values()]
        ids = self.read_pandaids()
        missing = [i for i in ids if i not in definitions]
        if missing:
            raise PilotError(
                ErrorCode.NOTDEFINED,
                f"PandaIDs {missing[:5]} of {self.files.pandaids} have no job spec",
            )
        return [Job.from_panda(definitions[i]) for i in ids]

    def read_pandaids(self) -> list[int]:
        data = read_json(self.path("pandaids"))
        if not isinstance(data, list):
            raise PilotError(ErrorCode.CONVERSIONFAILURE, f"{self.files.pandaids} is not a list")
        try:
            return [int(x) for x in data]
        except (TypeError, ValueError):
            raise PilotError(
                ErrorCode.CONVERSIONFAILURE, f"{self.files.pandaids} holds a non-number"
            ) from None

    def request_jobs(self, n_jobs: int = 1) -> None:
        atomic_write_json(self.path("job_request"), {"nJobs": int(n_jobs)})

    def wait_for_jobs(
        self, n_jobs: int = 1, timeout: float = 600.0, first_delay: float = 0.5
    ) -> list[Job]:
        """Pull mode: ask Harvester for jobs and wait (with backoff, at most ``timeout``) for them."""
        if not (self.path("job_spec").exists() or self.path("job_spec_alt").exists()):
            self.request_jobs(n_jobs)
        return _wait(self.read_jobs, timeout, first_delay, "job spec file")

    # -- event ranges --------------------------------------------------------
    def request_events(self, panda_id: int, jobset_id: int, task_id: int, n_ranges: int) -> None:
        entry = {"pandaID": panda_id, "jobsetID": jobset_id, "taskID": task_id, "nRanges": n_ranges}
        path = self.path("event_request", panda_id)
        try:
            old = read_json(path) if path.exists() else {}
        except PilotError as exc:
            log.warning("pending event request unreadable, replaced: %s", exc)
            old = {}
        merged = dict(old) if isinstance(old, dict) else {}
        merged[str(panda_id)] = entry
        atomic_write_json(path, merged)

    def take_event_ranges(self, panda_id: int | None = None) -> dict[int, list[dict]] | None:
        """Read and consume the event ranges file; None when Harvester has not written it yet."""
        path = self.path("event_ranges", panda_id)
        if not path.exists():
            return None
        data = read_json(path, code=ErrorCode.MESSAGEHANDLINGFAILURE)
        if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
            raise PilotError(
                ErrorCode.MESSAGEHANDLINGFAILURE, f"{path} is not a {{PandaID: [ranges]}} object"
            )
        try:
            ranges = {int(k): v for k, v in data.items()}
        except ValueError:
            raise PilotError(
                ErrorCode.MESSAGEHANDLINGFAILURE, f"{path}: a key is not a PandaID"
            ) from None
        path.unlink(missing_ok=True)
        return ranges

    def set_aside(self, key: str, panda_id: int | None = None) -> Path | None:
        """Move an unreadable file out of the way (kept for inspection as ``<name>.bad.<time>``)."""
        path = self.path(key, panda_id)
        target = path.with_name(f"{path.name}.bad.{time.time():.0f}")
        try:
            os.replace(path, target)
        except FileNotFoundError:
            return None
        log.warning("unreadable %s moved to %s", path.name, target.name)
        return target

    # -- files Harvester consumes by renaming --------------------------------
    def merge_write(self, key: str, entries: dict[str, list], panda_id: int | None = None) -> Path:
        """Add entries to ``X`` without overwriting what Harvester has not taken yet."""
        path = self.path(key, panda_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        private = path.with_name(f"{path.name}.pilot-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        leftovers = sorted(path.parent.glob(f"{path.name}.pilot-*"))
        try:
            os.rename(path, private)
            leftovers.append(private)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise PilotError(
                ErrorCode.FILEHANDLINGFAILURE, f"cannot take back {path}: {exc}"
            ) from None
        merged: dict[str, list] = {}
        for old in list(leftovers):
            try:
                merged = _merge(merged, _merge(read_json(old), {}))
            except PilotError as exc:
                bad = old.with_name(f"{path.name}.bad.{time.time():.0f}")
                log.warning("pending %s unreadable, kept as %s: %s", path.name, bad.name, exc)
                os.replace(old, bad)
                leftovers.remove(old)
        merged = _merge(merged, entries)
        try:
            atomic_write_json(path, merged)
        except OSError as exc:
            raise PilotError(ErrorCode.FILEHANDLINGFAILURE, f"cannot write {path}: {exc}") from None
        for old in leftovers:
            old.unlink(missing_ok=True)
        return path

    # -- state files ---------------------------------------------------------
    def write_worker_attributes(
        self, attributes: dict[str, Any], panda_id: int | None = None
    ) -> None:
        atomic_write_json(self.path("worker_attributes", panda_id), attributes)

    def write_job_report(self, report: Any, panda_id: int | None = None) -> None:
        atomic_write_json(self.path("job_report", panda_id), report)

    def heartbeat(self, info: dict[str, Any] | None = None) -> None:
        atomic_write_json(
            self.path("heartbeat"), {"timestamp": time.time(), **(info or {})}, fsync=False
        )

    def request_kill(self, reason: str = "") -> None:
        atomic_write_json(self.path("kill_worker"), {"timestamp": time.time(), "reason": reason})

    def kill_requested(self) -> bool:
        return self.path("kill_worker").exists()


def _access_point(value: HarvesterAccessPoint | str | Path) -> HarvesterAccessPoint:
    return value if isinstance(value, HarvesterAccessPoint) else HarvesterAccessPoint(value)


def _wait(read: Any, timeout: float, first_delay: float, what: str) -> Any:
    """Call ``read`` until it returns something, sleeping with exponential backoff."""
    end = time.monotonic() + timeout
    delay = first_delay
    last: PilotError | None = None
    for _ in range(10_000):
        try:
            value = read()
        except PilotError as exc:
            last, value = exc, None
        if value is not None:
            return value
        left = end - time.monotonic()
        if left <= 0:
            break
        time.sleep(min(delay, left))
        delay = min(delay * 2, 10.0)
    detail = f"no {what} after {timeout:.0f} s" + (f" (last error: {last.detail})" if last else "")
    raise PilotError(ErrorCode.EXCEEDEDMAXWAITTIME, detail)


def dump_entry(result: RangeResult, guid: str | None = None) -> dict[str, Any]:
    """An ``event_status.dump.json`` entry for one range (with its output when finished)."""
    entry: dict[str, Any] = {
        "eventRangeID": result.event_range_id,
        "eventStatus": result.status.value,
    }
    if result.status is RangeStatus.FINISHED and result.output_path:
        entry.update(
            path=result.output_path,
            type="es_output",
            chksum=result.adler32,
            fsize=result.fsize,
            guid=guid or str(uuid.uuid4()),
        )
    else:
        entry.update(errorCode=result.error_code, errorDiag=result.error_diag)
    return entry


class HarvesterEventSource:
    """Event ranges through the access point, with the PanDA client's two methods.

    ``get_event_ranges`` writes the request file and waits (backoff, at most
    ``wait_timeout``) for Harvester's ranges file, which it consumes; ranges of
    other jobs in it are kept for them. ``report_results`` hands outputs and
    statuses to Harvester in the stage-out dump; ``update_event_ranges``
    writes status-only updates. Both return True per entry once written.
    """

    def __init__(
        self,
        access_point: HarvesterAccessPoint | str | Path,
        *,
        wait_timeout: float = 300.0,
        first_delay: float = 0.2,
    ) -> None:
        self.ap = _access_point(access_point)
        self.wait_timeout = wait_timeout
        self.first_delay = first_delay
        self._buffer: dict[int, list[dict]] = {}
        self._no_more: set[int] = set()

    def _absorb(self, ranges: dict[int, list[dict]]) -> None:
        for pid, items in ranges.items():
            if not items:
                self._no_more.add(pid)
            self._buffer.setdefault(pid, []).extend(items)

    def get_event_ranges(
        self, panda_id: int, jobset_id: int, task_id: int, n_ranges: int
    ) -> list[dict]:
        if not self._buffer.get(panda_id) and panda_id not in self._no_more:
            self.ap.request_events(panda_id, jobset_id, task_id, n_ranges)

            def read() -> dict[int, list[dict]] | None:
                got = self.ap.take_event_ranges(panda_id if self.ap.many_jobs else None)
                if got is not None:
                    self._absorb(got)
                    if panda_id in got:
                        return got
                return None

            try:
                _wait(read, self.wait_timeout, self.first_delay, f"event ranges for {panda_id}")
            except PilotError:
                self.ap.set_aside("event_ranges", panda_id if self.ap.many_jobs else None)
                raise
        items = self._buffer.get(panda_id, [])
        out, self._buffer[panda_id] = items[:n_ranges], items[n_ranges:]
        return out

    def _write(self, key: str, by_pid: dict[int, list[dict]]) -> None:
        if self.ap.many_jobs:
            for pid, entries in by_pid.items():
                self.ap.merge_write(key, {str(pid): entries}, pid)
        else:
            self.ap.merge_write(key, {str(pid): e for pid, e in by_pid.items()})

    def update_event_ranges(self, entries: list[dict[str, Any]], version: int = 0) -> list[bool]:
        by_pid: dict[int, list[dict]] = {}
        for e in entries:
            pid = int(str(e["eventRangeID"]).split("-")[1])
            by_pid.setdefault(pid, []).append(
                {"eventRangeID": e["eventRangeID"], "eventStatus": e["eventStatus"]}
            )
        self._write("update_events", by_pid)
        return [True] * len(entries)

    def report_results(self, results: list[RangeResult]) -> list[bool]:
        by_pid: dict[int, list[dict]] = {}
        for r in results:
            by_pid.setdefault(r.panda_id, []).append(dump_entry(r))
        self._write("event_status_dump", by_pid)
        return [True] * len(results)


class HarvesterUpstream:
    """The :class:`~pilot.comm.base.Upstream` of ``pilot run --harvester DIR``.

    Heartbeats refresh ``worker_heartbeat.json`` and ``worker_attributes.json``
    (Harvester reads the job's state from it). The final update writes the
    attributes, the job report (``metaData``), the stage-out dump of the
    job's outputs and log, and then ``kill_worker.json`` when ``finish_worker``
    (one job per worker; in many-jobs mode the caller requests the kill once
    all jobs are done).
    """

    def __init__(
        self, access_point: HarvesterAccessPoint | str | Path, *, finish_worker: bool = True
    ) -> None:
        self.ap = _access_point(access_point)
        self.finish_worker = finish_worker and not self.ap.many_jobs

    def _attributes(self, fields_: dict[str, Any]) -> dict[str, Any]:
        attrs = {k: v for k, v in fields_.items() if k not in _NOT_ATTRIBUTES}
        attrs["jobStatus"] = fields_.get("state", "running")
        attrs.setdefault("timestamp", time.time())
        return attrs

    def heartbeat(self, job: Job, fields: dict[str, Any]) -> str | None:
        try:
            self.ap.write_worker_attributes(self._attributes(fields), job.panda_id)
            self.ap.heartbeat({"PandaID": job.panda_id, "state": fields.get("state", "running")})
        except OSError as exc:
            log.warning("heartbeat not written to %s: %s", self.ap.root, exc)
        return None

    def _outputs(self, job: Job) -> list[dict[str, Any]]:
        entries = []
        for f in job.all_outputs:
            if not f.local_path:
                continue
            parts = f.checksum_parts()
            entries.append(
                {
                    "path": str(Path(f.local_path).resolve()),
                    "type": "log" if f.kind == "log" else "output",
                    "chksum": parts[1] if parts else "",
                    "fsize": f.fsize,
                    "guid": f.guid,
                }
            )
        return entries

    def final_update(self, job: Job, fields: dict[str, Any]) -> bool:
        try:
            self.ap.write_worker_attributes(self._attributes(fields), job.panda_id)
            report = fields.get("metaData")
            if isinstance(report, str) and report:
                try:
                    report = json.loads(report)
                except ValueError:
                    report = {"metaData": report}
            if report:
                self.ap.write_job_report(report, job.panda_id)
            outputs = self._outputs(job)
            if outputs:
                self.ap.merge_write("event_status_dump", {str(job.panda_id): outputs}, job.panda_id)
            if self.finish_worker:
                self.ap.request_kill(f"job {job.panda_id} {fields.get('state', '')}")
        except (OSError, PilotError) as exc:
            log.error("final update not written to %s: %s", self.ap.root, exc)
            return False
        return True
