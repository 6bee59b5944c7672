"""Harvester's shared-file messenger, the pilot's side.

Harvester drives pilots through JSON files in the worker's access-point
directory (push mode, ARC CEs, HPC). This module alone knows the file names:
:class:`HarvesterFiles` holds Harvester's defaults, and a site that renamed
one in its ``[payload_interaction]`` configuration overrides that field.

Layout (Harvester's ``SharedFileMessenger``, see the reference page on it):
a OneToOne worker (one job) keeps every file at the top of the access point.
A ManyToOne worker (several ordinary jobs, HPC) has one directory
``<access point>/<PandaID>/`` per job with that job's spec, catalogue,
attributes, report and stage-out dump (:data:`PER_JOB_FILES`); the PandaID
list, the job and event requests, the event ranges, the heartbeat and the kill
file stay at the top. Harvester never feeds event ranges to a ManyToOne
worker, so an event-service job there cannot run. OneToMany (one job over
several workers) is refused: its results would need merging across workers.

Writing: every file is written atomically (temp file + rename). The two files
Harvester consumes by renaming (``event_status.dump.json`` and
``worker_updateevents.json``: ``X`` -> ``X.read`` -> ``X.read.<time>``) are
never overwritten while pending: the pilot first renames a pending ``X`` to a
private name (so Harvester cannot take it half-merged), merges the new entries
into it and writes ``X`` back; a crash in between leaves the private file,
merged on the next write. ``X.read`` is Harvester's and is left alone.

Reading: Harvester writes the job spec and the event ranges in place, not
atomically, so a file that does not parse may be one being written: it is
left where it is and read again; only a file that stays unreadable and
unchanged for a grace period is set aside as garbage. A missing or garbage
file raises :class:`PilotError` with a clear code.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import threading
import time
import uuid
from dataclasses import dataclass, fields
from enum import Enum
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from pilot.comm.pandaapi import panda_time  # Harvester passes times on to updateJob as they are
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


class MapType(str, Enum):
    """Harvester's ``WorkSpec.mapType`` values this pilot runs."""

    ONE_TO_ONE = "OneToOne"
    MANY_TO_ONE = "ManyToOne"

    @classmethod
    def parse(cls, value: str | MapType | None) -> MapType | None:
        """``None``/``auto``: detect from the files; anything else must be a known name."""
        if value is None or isinstance(value, MapType):
            return value
        if value.lower() == "auto":
            return None
        for m in cls:
            if value.lower() == m.value.lower():
                return m
        if value.lower() == "onetomany":
            raise PilotError(
                ErrorCode.BADQUEUECONFIGURATION,
                "Harvester map type OneToMany (one job over several workers) is not supported",
            )
        raise PilotError(
            ErrorCode.BADQUEUECONFIGURATION,
            f"unknown Harvester map type {value!r} (OneToOne, ManyToOne or auto)",
        )


# Files that live in <access point>/<PandaID>/ in a ManyToOne worker (SFM get_access_point).
PER_JOB_FILES = frozenset(
    {
        "job_spec",
        "job_spec_alt",
        "pool_file_catalog",
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


def parse_job_spec(text: str, where: str) -> dict[int, dict[str, Any]]:
    """``{PandaID: getJob dict}`` from a job spec file's text.

    Harvester writes ``{"<PandaID>": {...}}`` (JSON) or, with the queue option
    ``jobSpecFileFormat=cgi``, the URL-encoded getJob text with no wrapper.
    """
    stripped = text.lstrip()
    if stripped.startswith(("{", "[")) or not stripped:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PilotError(
                ErrorCode.CONVERSIONFAILURE, f"{where} is not valid JSON ({len(text)} bytes): {exc}"
            ) from None
    else:
        pairs = parse_qsl(stripped.strip(), keep_blank_values=True)
        data = dict(pairs)
        if "PandaID" not in data:
            raise PilotError(
                ErrorCode.CONVERSIONFAILURE, f"{where} is neither JSON nor a URL-encoded job"
            )
    if isinstance(data, dict) and "PandaID" in data:
        data = {str(data["PandaID"]): data}
    if (
        not isinstance(data, dict)
        or not data
        or not all(isinstance(v, dict) for v in data.values())
    ):
        raise PilotError(
            ErrorCode.CONVERSIONFAILURE, f"{where} is not a {{PandaID: job definition}} object"
        )
    out: dict[int, dict[str, Any]] = {}
    for key, value in data.items():
        try:
            out[int(key)] = value
        except ValueError:
            raise PilotError(
                ErrorCode.CONVERSIONFAILURE, f"{where}: PandaID {key!r} is not a number"
            ) from None
    return out


@dataclass
class WorkerJobs:
    """What the access point holds: jobs that validated, and the error of each that did not.

    ``failed`` is keyed by PandaID, or 0 when not even the PandaID is known.
    """

    jobs: list[Job]
    failed: dict[int, PilotError]

    def runnable(self, many_jobs: bool) -> WorkerJobs:
        """The jobs this worker can run. An event-service job in a ManyToOne worker cannot:
        Harvester feeds event ranges only to OneToOne workers, so it fails at once."""
        failed = dict(self.failed)
        jobs = []
        for job in self.jobs:
            if job.event_service and many_jobs:
                failed[job.panda_id] = PilotError(
                    ErrorCode.BADQUEUECONFIGURATION,
                    "event-service job in a ManyToOne worker: Harvester feeds event ranges "
                    "only to OneToOne workers",
                )
            else:
                jobs.append(job)
        return WorkerJobs(jobs, failed)


class HarvesterAccessPoint:
    """The access-point directory of one worker."""

    def __init__(
        self,
        root: str | Path,
        files: HarvesterFiles | None = None,
        *,
        map_type: MapType | str | None = None,
        many_jobs: bool = False,
    ) -> None:
        self.root = Path(root)
        self.files = files or HarvesterFiles()
        parsed = MapType.parse(map_type)
        self._map_type: MapType | None = MapType.MANY_TO_ONE if many_jobs else parsed

    # -- layout --------------------------------------------------------------
    @property
    def map_type(self) -> MapType:
        """The map type given, else the one the files show (OneToOne until they show one)."""
        if self._map_type is None:
            found = self.detect_map_type()
            if found is None:
                return MapType.ONE_TO_ONE
            self._map_type = found
        return self._map_type

    @property
    def many_jobs(self) -> bool:
        return self.map_type is MapType.MANY_TO_ONE

    def detect_map_type(self) -> MapType | None:
        """A job spec at the top means OneToOne; one under ``<PandaID>/``, ManyToOne."""
        names = (self.files.job_spec, self.files.job_spec_alt)
        if any((self.root / n).exists() for n in names):
            return MapType.ONE_TO_ONE
        try:
            subdirs = [d for d in self.root.iterdir() if d.name.isdigit() and d.is_dir()]
        except OSError:
            return None
        if any((d / n).exists() for d in subdirs for n in names):
            return MapType.MANY_TO_ONE
        return None

    def job_dir(self, panda_id: int) -> Path:
        """Harvester's ``get_access_point(workspec, panda_id)``."""
        return self.root / str(int(panda_id)) if self.many_jobs else self.root

    def path(self, key: str, panda_id: int | None = None) -> Path:
        name = getattr(self.files, key)
        if key in PER_JOB_FILES and self.many_jobs:
            if panda_id is None:
                raise PilotError(ErrorCode.NOTDEFINED, f"{name} needs a PandaID in ManyToOne mode")
            return self.root / str(int(panda_id)) / name
        return self.root / name

    # -- jobs ----------------------------------------------------------------
    def _read_spec(self, panda_id: int | None) -> dict[int, dict[str, Any]]:
        for key in ("job_spec", "job_spec_alt"):
            path = self.path(key, panda_id)
            if path.exists():
                break
        else:
            where = self.root / str(panda_id) if panda_id is not None else self.root
            raise PilotError(
                ErrorCode.NOSUCHFILE,
                f"no job spec file ({self.files.job_spec} or {self.files.job_spec_alt}) in {where}",
            )
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise PilotError(ErrorCode.FILEHANDLINGFAILURE, f"cannot read {path}: {exc}") from None
        return parse_job_spec(text, str(path))

    def _job_ids(self) -> list[int]:
        """ManyToOne: the PandaIDs of ``worker_pandaids.json``, else the job directories."""
        if self.path("pandaids").exists():
            return self.read_pandaids()
        names = (self.files.job_spec, self.files.job_spec_alt)
        return sorted(
            int(d.name)
            for d in self.root.iterdir()
            if d.name.isdigit() and any((d / n).exists() for n in names)
        )

    def read_job_definitions(self) -> dict[int, dict[str, Any]]:
        """``{PandaID: job definition}``; the first unreadable job spec raises."""
        if not self.many_jobs:
            return self._read_spec(None)
        out: dict[int, dict[str, Any]] = {}
        for pid in self._job_ids():
            out.update(self._one_job(pid))
        return out

    def _one_job(self, pid: int) -> dict[int, dict[str, Any]]:
        got = self._read_spec(pid)
        if pid not in got:
            raise PilotError(
                ErrorCode.CONVERSIONFAILURE,
                f"{self.path('job_spec', pid)} holds PandaIDs {sorted(got)[:5]}, not {pid}",
            )
        return {pid: got[pid]}

    def read_jobs(self) -> list[Job]:
        return [Job.from_panda(d) for d in self.read_job_definitions().values()]

    def worker_jobs(self) -> list[Job]:
        """The jobs fed to this worker; any invalid one raises (see :meth:`scan_jobs`)."""
        found = self.scan_jobs()
        if found.failed:
            raise next(iter(found.failed.values()))
        if not found.jobs:
            raise PilotError(ErrorCode.NOSUCHFILE, f"no job in {self.root}")
        return found.jobs

    def scan_jobs(self) -> WorkerJobs:
        """Every job fed to this worker, each validated on its own.

        A job whose spec is missing or invalid is in ``failed`` with its error,
        so the caller can still give Harvester that job's attributes; an error
        before any PandaID is known (no spec at all, a garbage top-level spec,
        a garbage PandaID list) is under PandaID 0.
        """
        jobs: list[Job] = []
        failed: dict[int, PilotError] = {}
        if not self.many_jobs:
            try:
                definitions = self._read_spec(None)
            except PilotError as exc:
                return WorkerJobs([], {self._pandaid_hint(): exc})
            wanted = self._wanted_ids(failed)
            if wanted is not None:
                for pid in wanted:
                    if pid not in definitions:
                        failed[pid] = PilotError(
                            ErrorCode.NOTDEFINED,
                            f"PandaID {pid} of {self.files.pandaids} has no job spec",
                        )
                definitions = {p: definitions[p] for p in wanted if p in definitions}
            for pid, d in definitions.items():
                _validate(pid, d, jobs, failed)
            return WorkerJobs(jobs, failed)
        try:
            ids = self._job_ids()
        except (PilotError, OSError) as exc:
            err = exc if isinstance(exc, PilotError) else _os_error(exc, self.root)
            return WorkerJobs([], {0: err})
        if not ids:
            return WorkerJobs([], {0: PilotError(ErrorCode.NOSUCHFILE, f"no job in {self.root}")})
        for pid in ids:
            try:
                definition = self._one_job(pid)[pid]
            except PilotError as exc:
                failed[pid] = exc
                continue
            _validate(pid, definition, jobs, failed)
        return WorkerJobs(jobs, failed)

    def _wanted_ids(self, failed: dict[int, PilotError]) -> list[int] | None:
        if not self.path("pandaids").exists():
            return None
        try:
            return self.read_pandaids()
        except PilotError as exc:
            failed[0] = exc
            return None

    def _pandaid_hint(self) -> int:
        """The PandaID of an unreadable OneToOne job, when ``worker_pandaids.json`` has one."""
        try:
            ids = self.read_pandaids()
        except PilotError:
            return 0
        return ids[0] if len(ids) == 1 else 0

    def known_pandaids(self) -> list[int]:
        """PandaIDs this worker has by any account (for reporting failures)."""
        ids: set[int] = set()
        try:
            ids.update(self.read_pandaids())
        except PilotError:
            pass
        try:
            ids.update(int(d.name) for d in self.root.iterdir() if d.name.isdigit() and d.is_dir())
        except OSError:
            pass
        return sorted(ids)

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
    ) -> WorkerJobs:
        """Pull mode: ask Harvester for jobs and wait (with backoff, at most ``timeout``).

        Harvester writes the job specs in place, then ``worker_pandaids.json``,
        then deletes the request: the jobs are read once the request is gone.
        """
        if self.detect_map_type() is None:
            self.request_jobs(n_jobs)

        def read() -> WorkerJobs | None:
            if self.path("job_request").exists() or self.detect_map_type() is None:
                return None
            if self._map_type is None:
                self._map_type = self.detect_map_type()
            found = self.scan_jobs()
            return found if found.jobs or found.failed else None

        return _wait(read, timeout, first_delay, "job spec file")

    # -- event ranges --------------------------------------------------------
    def request_events(self, panda_id: int, jobset_id: int, task_id: int, n_ranges: int) -> None:
        entry = {"pandaID": panda_id, "jobsetID": jobset_id, "taskID": task_id, "nRanges": n_ranges}
        path = self.path("event_request")
        try:
            old = read_json(path) if path.exists() else {}
        except PilotError as exc:
            log.warning("pending event request unreadable, replaced: %s", exc)
            old = {}
        merged = dict(old) if isinstance(old, dict) else {}
        merged[str(panda_id)] = entry
        atomic_write_json(path, merged)

    def take_event_ranges(self) -> dict[int, list[dict]] | None:
        """Read and consume the event ranges file; None when there is none.

        A file that does not parse raises (it may still be being written by
        Harvester) and stays where it is; one that parses is removed.
        """
        path = self.path("event_ranges")
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
        """Add entries to ``X`` without overwriting what Harvester has not taken yet.

        Several processes of one pilot write the same file (rank 0 its jobs' outputs,
        its upstream link the ranges' results): a lock beside the file makes each
        take-merge-write whole, or one would write over the other's entries."""
        path = self.path(key, panda_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = path.with_name(f".{path.name}.lock")
        with open(lock, "a") as held:
            fcntl.flock(held, fcntl.LOCK_EX)
            try:
                return self._merge_write(path, entries)
            finally:
                fcntl.flock(held, fcntl.LOCK_UN)

    def _merge_write(self, path: Path, entries: dict[str, list]) -> Path:
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

    def fail_worker(self, failed: dict[int, PilotError], node: str = "", kill: bool = True) -> None:
        """Give Harvester the failed attributes of jobs that could not start, and end the worker.

        Errors without a PandaID go to every job this worker is known to have;
        when none is known they go to the top of the access point (where a
        OneToOne worker's attributes are), so the reason is on disk either way.
        """
        now = panda_time(time.time())
        targets: dict[int | None, PilotError] = {}
        for pid, exc in failed.items():
            if pid:
                targets[pid] = exc
            else:
                known = self.known_pandaids()
                for k in known or [None]:  # type: ignore[list-item]
                    targets.setdefault(k, exc)
                if not self.many_jobs:
                    targets.setdefault(None, exc)
        for pid, exc in targets.items():
            if pid is not None and pid not in failed and self._final(pid):
                continue  # a job that ended keeps its own state
            attrs = {
                "jobStatus": "failed",
                "pilotErrorCode": int(exc.code),
                "pilotErrorDiag": exc.diag[:256],
                "node": node,
                "startTime": now,
                "endTime": now,
            }
            try:
                if pid is None or not self.many_jobs:
                    atomic_write_json(self.root / self.files.worker_attributes, attrs)
                else:
                    self.write_worker_attributes(attrs, pid)
            except OSError as write_error:
                log.error("attributes of job %s not written: %s", pid, write_error)
        if kill:
            reasons = "; ".join(f"{p or '?'}: {e.diag}" for p, e in failed.items())
            try:
                self.request_kill(f"jobs failed to start: {reasons}"[:1000])
            except OSError as exc:
                log.error("kill file not written in %s: %s", self.root, exc)

    def _final(self, panda_id: int) -> bool:
        try:
            attrs = read_json(self.path("worker_attributes", panda_id))
        except PilotError:
            return False
        return isinstance(attrs, dict) and attrs.get("jobStatus") in ("finished", "failed")


def _os_error(exc: OSError, where: Path) -> PilotError:
    return PilotError(ErrorCode.FILEHANDLINGFAILURE, f"cannot read {where}: {exc}")


def _validate(
    pid: int, definition: dict[str, Any], jobs: list[Job], failed: dict[int, PilotError]
) -> None:
    try:
        jobs.append(Job.from_panda(definition))
    except PilotError as exc:
        failed[pid] = exc


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

    Harvester answers a request once per monitor plus event-feeder cycle
    (minutes), so requests are sized to keep the job's slots busy for
    ``cycles`` such latencies at the rate ranges have been used so far, and the
    next request goes out while the buffer still covers the latency.
    ``get_event_ranges`` returns buffered ranges at once, ``[]`` once
    Harvester said there are no more, and ``None`` while an answer is on its
    way (``pending_is_error``: a PilotError instead, for callers that retry on
    errors); only an answer missing for ``wait_timeout`` is an error.
    ``report_results`` and ``update_event_ranges`` write the stage-out dump:
    Harvester rewrites ``worker_updateevents.json`` from the dump itself,
    overwriting what the pilot may have put there, so status-only updates go
    into the dump too. Both return True per entry once written.
    """

    def __init__(
        self,
        access_point: HarvesterAccessPoint | str | Path,
        *,
        wait_timeout: float = 1800.0,
        first_delay: float = 0.2,
        block: float = 0.0,
        latency: float = 600.0,
        cycles: float = 3.0,
        max_request: int = 10_000,
        garbage_grace: float = 60.0,
        pending_is_error: bool = False,
        clock: Any = time.monotonic,
    ) -> None:
        self.ap = _access_point(access_point)
        self.wait_timeout = wait_timeout
        self.first_delay = first_delay
        self.block = block
        self.latency = latency
        self.cycles = cycles
        self.max_request = max_request
        self.garbage_grace = garbage_grace
        self.pending_is_error = pending_is_error
        self.clock = clock
        self._buffer: dict[int, list[dict]] = {}
        self._no_more: set[int] = set()
        self._asked: dict[int, float] = {}  # PandaID -> when the unanswered request went out
        self._keys: dict[int, tuple[int, int]] = {}
        self._last_n: dict[int, int] = {}
        self._handed: dict[int, int] = {}
        self._first: dict[int, float] = {}
        self._starved: dict[int, float] = {}  # seconds with nothing to hand out
        self._starved_at: dict[int, float] = {}
        self._garbage: tuple[float, int, float] | None = None  # (mtime, size, first seen)
        self.requests = 0

    # -- sizing --------------------------------------------------------------
    def rate(self, panda_id: int) -> float:
        """Ranges per second this job takes while it has ranges (0 until measurable).

        Time spent waiting for Harvester with nothing to hand out does not count:
        a rate measured through starvation would size the next request too small
        and starve the slots again."""
        first = self._first.get(panda_id)
        if first is None:
            return 0.0
        now = self.clock()
        starved = self._starved.get(panda_id, 0.0)
        since = self._starved_at.get(panda_id)
        if since is not None:
            starved += now - since
        busy = now - first - starved
        handed = self._handed.get(panda_id, 0)
        return handed / max(busy, 0.1) if handed else 0.0

    def request_size(self, panda_id: int, n_ranges: int) -> int:
        """Enough for ``cycles`` Harvester latencies at the measured rate, at least ``n_ranges``
        (and, before any rate is known, four times the free slots asked for)."""
        rate = self.rate(panda_id)
        ahead = math.ceil(rate * self.latency * self.cycles) if rate else 4 * n_ranges
        want = max(n_ranges, ahead) - len(self._buffer.get(panda_id, []))
        return max(1, min(self.max_request, max(want, n_ranges)))

    def _low(self, panda_id: int) -> bool:
        """The buffer no longer covers one latency: ask now, not when it is empty."""
        return len(self._buffer.get(panda_id, [])) <= self.rate(panda_id) * self.latency

    # -- the request / answer cycle ------------------------------------------
    def _ask(self, panda_id: int, n_ranges: int) -> None:
        jobset_id, task_id = self._keys[panda_id]
        n = self.request_size(panda_id, n_ranges)
        self.ap.request_events(panda_id, jobset_id, task_id, n)
        self._asked[panda_id] = self.clock()
        self.requests += 1
        log.info("asked Harvester for %d ranges of job %d", n, panda_id)

    def _absorb(self, ranges: dict[int, list[dict]]) -> None:
        for pid, items in ranges.items():
            if not items:
                self._no_more.add(pid)
            self._buffer.setdefault(pid, []).extend(items)
            self._asked.pop(pid, None)

    def _poll(self) -> None:
        """Take the ranges file if Harvester has written it completely."""
        try:
            got = self.ap.take_event_ranges()
        except PilotError as exc:
            self._unreadable(exc)
            return
        self._garbage = None
        if got is not None:
            self._absorb(got)

    def _unreadable(self, exc: PilotError) -> None:
        """A ranges file that does not parse is left alone: Harvester may be writing it.
        Only one unchanged for ``garbage_grace`` is garbage: set aside, and asked again."""
        path = self.ap.path("event_ranges")
        try:
            st = path.stat()
        except OSError:
            return
        now = self.clock()
        if self._garbage is None or self._garbage[:2] != (st.st_mtime, st.st_size):
            self._garbage = (st.st_mtime, st.st_size, now)
            log.info("ranges file not readable yet (%s): read again later", exc.detail)
            return
        if now - self._garbage[2] >= self.garbage_grace:
            log.error(
                "ranges file unreadable for %.0f s: set aside (%s)", now - self._garbage[2], exc
            )
            self.ap.set_aside("event_ranges")
            self._garbage = None
            for pid in list(self._asked):  # what was in it is gone: ask again
                self._ask(pid, self._last_n.get(pid, 1))

    def _check_request(self, panda_id: int, n_ranges: int) -> None:
        """Re-ask when the request vanished unanswered (Harvester deleted a request written
        just after its previous answer) or the answer is overdue."""
        asked = self._asked.get(panda_id)
        if asked is None:
            return
        overdue = self.clock() - asked >= self.wait_timeout
        lost = (
            not self.ap.path("event_request").exists() and not self.ap.path("event_ranges").exists()
        )
        if lost or overdue:
            self._ask(panda_id, n_ranges)
        if overdue:
            raise PilotError(
                ErrorCode.EXCEEDEDMAXWAITTIME,
                f"no event ranges for {panda_id} from Harvester after {self.wait_timeout:.0f} s "
                "(asked again)",
            )

    def get_event_ranges(
        self, panda_id: int, jobset_id: int, task_id: int, n_ranges: int
    ) -> list[dict] | None:
        self._keys[panda_id] = (jobset_id, task_id)
        self._last_n[panda_id] = n_ranges
        self._first.setdefault(panda_id, self.clock())
        end = self.clock() + self.block
        delay = self.first_delay
        for _ in range(10_000):  # bounded; sleeps between turns
            self._poll()
            if panda_id not in self._no_more and panda_id not in self._asked:
                if self._low(panda_id):
                    self._ask(panda_id, n_ranges)
            items = self._buffer.get(panda_id, [])
            if items:
                since = self._starved_at.pop(panda_id, None)
                if since is not None:
                    self._starved[panda_id] = (
                        self._starved.get(panda_id, 0.0) + self.clock() - since
                    )
                out, self._buffer[panda_id] = items[:n_ranges], items[n_ranges:]
                self._handed[panda_id] = self._handed.get(panda_id, 0) + len(out)
                return out
            if panda_id in self._no_more:
                return []
            self._check_request(panda_id, n_ranges)
            left = end - self.clock()
            if left <= 0:
                break
            time.sleep(min(delay, left))
            delay = min(delay * 2, 5.0)
        self._starved_at.setdefault(panda_id, self.clock())
        if self.pending_is_error:
            raise PilotError(
                ErrorCode.EXCEEDEDMAXWAITTIME, f"event ranges for {panda_id} not there yet"
            )
        return None

    def _write(self, by_pid: dict[int, list[dict]]) -> None:
        if self.ap.many_jobs:
            for pid, entries in by_pid.items():
                self.ap.merge_write("event_status_dump", {str(pid): entries}, pid)
        else:
            self.ap.merge_write("event_status_dump", {str(pid): e for pid, e in by_pid.items()})

    def update_event_ranges(self, entries: list[dict[str, Any]], version: int = 0) -> list[bool]:
        by_pid: dict[int, list[dict]] = {}
        for e in entries:
            pid = int(str(e["eventRangeID"]).split("-")[1])
            by_pid.setdefault(pid, []).append(
                {"eventRangeID": e["eventRangeID"], "eventStatus": e["eventStatus"]}
            )
        self._write(by_pid)
        return [True] * len(entries)

    def report_results(self, results: list[RangeResult]) -> list[bool]:
        by_pid: dict[int, list[dict]] = {}
        for r in results:
            by_pid.setdefault(r.panda_id, []).append(dump_entry(r))
        self._write(by_pid)
        return [True] * len(results)


class HarvesterUpstream:
    """The :class:`~pilot.comm.base.Upstream` of ``pilot run --harvester DIR``.

    Heartbeats refresh ``worker_heartbeat.json`` and ``worker_attributes.json``
    (Harvester reads the job's state from it). The final update writes the
    attributes, the job report (``metaData``), the stage-out dump of the
    job's outputs and log, and then ``kill_worker.json`` when ``finish_worker``
    (one job per worker; in ManyToOne mode the caller requests the kill once
    all jobs are done).
    """

    def __init__(
        self, access_point: HarvesterAccessPoint | str | Path, *, finish_worker: bool = True
    ) -> None:
        self.ap = _access_point(access_point)
        self.finish_worker = finish_worker and not self.ap.many_jobs

    def _attributes(self, fields_: dict[str, Any]) -> dict[str, Any]:
        """updateJob fields as Harvester passes them on: epoch times in PanDA's format
        (Harvester converts only datetimes), the attempt number a number."""
        attrs = {k: v for k, v in fields_.items() if k not in _NOT_ATTRIBUTES}
        attrs["jobStatus"] = fields_.get("state", "running")
        attrs.setdefault("timestamp", time.time())
        for key in ("startTime", "endTime"):
            if isinstance(attrs.get(key), (int, float)):
                attrs[key] = panda_time(float(attrs[key]))
        if isinstance(attrs.get("attemptNr"), str) and attrs["attemptNr"].isdigit():
            attrs["attemptNr"] = int(attrs["attemptNr"])
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


class WorkerHeartbeat:
    """Refreshes ``worker_heartbeat.json`` every ``interval`` seconds while the worker runs.

    Harvester kills a worker whose heartbeat file is older than the queue's
    ``worker_heartbeat`` minutes, whatever the worker is doing: a payload,
    event ranges, or ranks of ``pilot hpc``. A thread that sleeps on an event
    keeps the file fresh through all of them; ``info`` says what runs.
    """

    def __init__(
        self, access_point: HarvesterAccessPoint, interval: float = 20.0, info: Any = None
    ) -> None:
        if interval <= 0:
            raise PilotError(ErrorCode.NOTDEFINED, f"heartbeat interval {interval} is not > 0")
        self.ap = access_point
        self.interval = interval
        self.info = info or (lambda: {})
        self.beats = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="harvester-heartbeat", daemon=True)

    def beat(self) -> None:
        try:
            self.ap.heartbeat(self.info())
            self.beats += 1
        except (OSError, PilotError) as exc:
            log.warning("heartbeat not written to %s: %s", self.ap.root, exc)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.beat()

    def __enter__(self) -> WorkerHeartbeat:
        self.beat()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5.0)
        self.beat()
