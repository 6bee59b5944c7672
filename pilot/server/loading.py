"""Loading jobs and event-service tasks into the dispatcher's store.

A job is a PanDA job definition (the dict getJob hands out). A task is a job
template plus how to cut its input into event ranges::

    {"jediTaskID": 7, "nJobs": 2, "nRanges": 10, "nEventsPerRange": 100,
     "LFN": "EVNT.01.pool.root", "GUID": "...", "scope": "mc23", "fileID": 1,
     "job": {...job template...}}

Each of the task's jobs gets ``nRanges`` ranges with PanDA's identifiers,
``<jediTaskID>-<PandaID>-<fileID>-<jobProcessID>-<attemptNr>``; ranges of
one task cover consecutive events of the file, so no event is given twice.
Definitions are validated with the pilot's own model before they are
stored: a job the pilot would reject is refused at load time, with the reason.
"""

from __future__ import annotations

import uuid
from typing import Any

from pilot.errors import PilotError
from pilot.job import Job, check_lfn
from pilot.queue import QueueConfig
from pilot.server.db import Store, StoreError

MAX_JOBS_PER_LOAD = 10_000
MAX_RANGES_PER_JOB = 1_000_000


def _positive_int(d: dict[str, Any], key: str, default: int | None, maximum: int) -> int:
    value = d.get(key, default)
    if value is None:
        raise StoreError(f"'{key}' is required")
    if isinstance(value, bool):
        raise StoreError(f"'{key}' must be an integer")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise StoreError(f"'{key}' must be an integer, got {value!r}") from None
    if not 1 <= number <= maximum:
        raise StoreError(f"'{key}' must be between 1 and {maximum}, got {number}")
    return number


def _prepare(definition: Any, panda_id: int) -> dict[str, Any]:
    """A stored definition: PanDA keys, PandaID set, validated as the pilot will."""
    if not isinstance(definition, dict):
        raise StoreError(f"a job must be a JSON object, got {type(definition).__name__}")
    d = dict(definition)
    d["PandaID"] = panda_id
    d.setdefault("attemptNr", 1)
    try:
        Job.from_panda(d)
    except PilotError as exc:
        raise StoreError(f"job {panda_id}: {exc.diag}") from None
    return d


def _given_id(definition: Any) -> int | None:
    if not isinstance(definition, dict):
        return None
    value = definition.get("PandaID")
    if value in (None, "", "NULL"):
        return None
    if isinstance(value, bool):
        raise StoreError("'PandaID' must be an integer")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise StoreError(f"'PandaID' must be an integer, got {value!r}") from None
    if number < 1:
        raise StoreError(f"'PandaID' must be positive, got {number}")
    return number


def load_jobs(store: Store, definitions: list[Any]) -> list[int]:
    """Store jobs (all or none); a missing ``PandaID`` is assigned. Returns the ids."""
    if not isinstance(definitions, list) or not definitions:
        raise StoreError("expected a job object or a non-empty list of them")
    if len(definitions) > MAX_JOBS_PER_LOAD:
        raise StoreError(f"at most {MAX_JOBS_PER_LOAD} jobs per load")
    ids = []
    with store.tx() as conn:
        for definition in definitions:
            panda_id = _given_id(definition) or store.next_panda_id(conn)
            ids.append(store.insert_job(conn, _prepare(definition, panda_id)))
    return ids


def load_task(store: Store, task: Any) -> dict[str, Any]:
    """Store an event-service task: ``nJobs`` jobs with ``nRanges`` ranges each."""
    if not isinstance(task, dict):
        raise StoreError(f"a task must be a JSON object, got {type(task).__name__}")
    template = task.get("job")
    if not isinstance(template, dict):
        raise StoreError("a task needs a 'job' template object")
    n_jobs = _positive_int(task, "nJobs", 1, MAX_JOBS_PER_LOAD)
    n_ranges = _positive_int(task, "nRanges", None, MAX_RANGES_PER_JOB)
    per_range = _positive_int(task, "nEventsPerRange", 1, 10**9)
    file_id = _positive_int(task, "fileID", 1, 10**15)
    first_event = int(task.get("firstEvent", 0) or 0)
    lfn = task.get("LFN") or _first_input(template) or "events.data"
    try:
        check_lfn(str(lfn), "LFN")
    except PilotError as exc:
        raise StoreError(exc.diag) from None
    guid = str(task.get("GUID") or uuid.uuid4())
    scope = str(task.get("scope") or template.get("scopeIn") or "")
    pfn = str(task.get("PFN") or "")
    ids = []
    with store.tx() as conn:
        task_id = int(task.get("jediTaskID") or template.get("taskID") or 0) or (
            store.next_task_id(conn)
        )
        for j in range(n_jobs):
            panda_id = store.next_panda_id(conn)
            definition = dict(template)
            definition.pop("PandaID", None)
            definition.update(
                {
                    "taskID": task_id,
                    "jobsetID": int(template.get("jobsetID") or task_id),
                    "eventService": "True",
                }
            )
            definition = _prepare(definition, panda_id)
            attempt = int(definition["attemptNr"])
            store.insert_job(conn, definition)
            ranges = []
            for k in range(n_ranges):
                index = j * n_ranges + k
                start = first_event + index * per_range
                ranges.append(
                    {
                        "eventRangeID": f"{task_id}-{panda_id}-{file_id}-{index + 1}-{attempt}",
                        "startEvent": start,
                        "lastEvent": start + per_range - 1,
                        "LFN": str(lfn),
                        "GUID": guid,
                        "scope": scope,
                        "PFN": pfn,
                    }
                )
            store.insert_ranges(conn, panda_id, attempt, ranges)
            ids.append(panda_id)
    return {"jediTaskID": task_id, "PandaIDs": ids, "nRanges": n_ranges * n_jobs}


def _first_input(template: dict[str, Any]) -> str:
    value = template.get("inFiles")
    if isinstance(value, str) and value not in ("", "NULL"):
        return value.split(",")[0].strip()
    return ""


STORAGE_PROTOCOLS = ("read_lan", "read_wan", "write_lan", "write_wan")


def load_queue(store: Store, description: Any) -> str:
    """Store a queue description (bare or ``{queue: {...}}``), validated; returns its name."""
    try:
        queue = QueueConfig.from_dict(description)
    except PilotError as exc:
        raise StoreError(exc.diag) from None
    store.put_queue(queue.nickname, queue.to_dict())
    return queue.nickname


def load_storages(store: Store, storages: Any) -> list[str]:
    """Store CRIC storage descriptions ``{ddm_endpoint: {...}}``, checked as the PanDA pilot
    needs them: ``is_deterministic`` and ``arprotocols`` keyed by read/write and lan/wan."""
    if not isinstance(storages, dict) or not storages:
        raise StoreError("storages must be a non-empty object {ddm_endpoint: {...}}")
    for name, desc in storages.items():
        if not isinstance(desc, dict):
            raise StoreError(f"storage {name[:64]!r} must be an object")
        if "is_deterministic" not in desc:
            raise StoreError(f"storage {name[:64]!r} needs 'is_deterministic'")
        protocols = desc.get("arprotocols")
        if not isinstance(protocols, dict) or not set(protocols) <= set(STORAGE_PROTOCOLS):
            raise StoreError(
                f"storage {name[:64]!r}: 'arprotocols' keyed by {', '.join(STORAGE_PROTOCOLS)}"
            )
    store.put_storages(storages)
    return sorted(storages)
