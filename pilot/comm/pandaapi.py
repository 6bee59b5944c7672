"""The PanDA server's ``/api/v1`` pilot API: names, types and answers (docs/DESIGN.md).

The pilot builds its calls with the legacy names (``updateJob`` with
``jobId``, ``state``, ``xml`` ...): the spool, the workflow and Yoda all keep
those, and an old server takes them as they are. For a current server this
module turns one legacy call into its ``/api/v1`` successor and the
``{success, message, data}`` answer back into the legacy answer the rest of
the pilot reads, so both APIs meet in one place.

The server checks every parameter against its annotation and rejects a
parameter it does not know, so a value is converted to the exact JSON type
(``memory`` an integer, ``start_time`` a ``%Y-%m-%d %H:%M:%S`` string,
``event_ranges`` a JSON *string*) and a legacy field with no successor is
left out, never sent.
"""

from __future__ import annotations

import calendar
import json
import logging
import math
import time
from dataclasses import dataclass
from enum import Enum
from typing import Any

log = logging.getLogger(__name__)

PANDA_TIME = "%Y-%m-%d %H:%M:%S"
NULLS = (None, "", "NULL", "None")


class Api(str, Enum):
    """Which pilot API a client speaks (``--panda-api``)."""

    V1 = "v1"
    LEGACY = "legacy"
    AUTO = "auto"


def panda_time(value: float | None = None) -> str:
    """A time as PanDA parses it: ``%Y-%m-%d %H:%M:%S`` in UTC."""
    return time.strftime(PANDA_TIME, time.gmtime(time.time() if value is None else value))


def epoch_of(value: Any) -> float:
    """Seconds since the epoch of a PanDA time or of epoch seconds (older pilots send those)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    text = str(value).strip()
    try:
        return float(text)
    except ValueError:
        return float(calendar.timegm(time.strptime(text, PANDA_TIME)))


class Kind(str, Enum):
    """The JSON type a v1 parameter must have (the server's annotation)."""

    INT = "int"
    STR = "str"
    FLOAT = "float"
    NUMBER = "number"  # int | float
    BOOL = "bool"
    TIME = "time"  # str in PanDA's time format
    JSON_STR = "json_str"  # a JSON document inside a string
    ANY = "any"  # not annotated: sent as it is


@dataclass(frozen=True)
class Endpoint:
    """One v1 function: its path, HTTP method, and legacy name -> (v1 name, kind)."""

    path: str
    verb: str
    params: dict[str, tuple[str, Kind]]
    required: tuple[str, ...] = ()


_I, _S, _F, _N, _B = Kind.INT, Kind.STR, Kind.FLOAT, Kind.NUMBER, Kind.BOOL

ACQUIRE_JOBS = Endpoint(
    "pilot/acquire_jobs",
    "POST",
    {
        "siteName": ("site_name", _S),
        "timeout": ("timeout", _I),
        "mem": ("memory", _I),
        "diskSpace": ("disk_space", _I),
        "prodSourceLabel": ("prod_source_label", _S),
        "node": ("node", _S),
        "computingElement": ("computing_element", _S),
        "prodUserID": ("prod_user_id", _S),
        "getProxyKey": ("get_proxy_key", _S),
        "taskID": ("task_id", _I),
        "nJobs": ("n_jobs", _I),
        "background": ("background", _B),
        "resourceType": ("resource_type", _S),
        "harvester_id": ("harvester_id", _S),
        "worker_id": ("worker_id", _I),
        "schedulerID": ("scheduler_id", _S),
        "jobType": ("job_type", _S),
        "viaTopic": ("via_topic", _B),
        "remaining_time": ("remaining_time", Kind.ANY),
    },
    ("site_name",),
)

UPDATE_JOB = Endpoint(
    "pilot/update_job",
    "POST",
    {
        "jobId": ("job_id", _I),
        "state": ("job_status", _S),
        "xml": ("job_output_report", _S),
        "node": ("node", _S),
        "cpuConsumptionTime": ("cpu_consumption_time", _I),
        "cpuConsumptionUnit": ("cpu_consumption_unit", _S),
        "schedulerID": ("scheduler_id", _S),
        "pilotID": ("pilot_id", _S),
        "siteName": ("site_name", _S),
        "pilotLog": ("pilot_log", _S),
        "metaData": ("meta_data", _S),
        "cpuConversionFactor": ("cpu_conversion_factor", _N),
        "transExitCode": ("trans_exit_code", _I),
        "pilotErrorCode": ("pilot_error_code", _I),
        "pilotErrorDiag": ("pilot_error_diag", _S),
        "exeErrorCode": ("exe_error_code", _I),
        "exeErrorDiag": ("exe_error_diag", _S),
        "pilotTiming": ("pilot_timing", _S),
        "startTime": ("start_time", Kind.TIME),
        "endTime": ("end_time", Kind.TIME),
        "nEvents": ("n_events", _I),
        "nInputFiles": ("n_input_files", _I),
        "batchID": ("batch_id", _S),
        "attemptNr": ("attempt_nr", _I),
        "jobMetrics": ("job_metrics", _S),
        "stdout": ("stdout", _S),
        "jobSubStatus": ("job_sub_status", _S),
        "coreCount": ("core_count", _I),
        "maxRSS": ("max_rss", _N),
        "maxVMEM": ("max_vmem", _N),
        "maxSWAP": ("max_swap", _N),
        "maxPSS": ("max_pss", _N),
        "avgRSS": ("avg_rss", _N),
        "avgVMEM": ("avg_vmem", _N),
        "avgSWAP": ("avg_swap", _N),
        "avgPSS": ("avg_pss", _N),
        "totRCHAR": ("tot_rchar", _N),
        "totWCHAR": ("tot_wchar", _N),
        "totRBYTES": ("tot_rbytes", _N),
        "totWBYTES": ("tot_wbytes", _N),
        "rateRCHAR": ("rate_rchar", _N),
        "rateWCHAR": ("rate_wchar", _N),
        "rateRBYTES": ("rate_rbytes", _N),
        "rateWBYTES": ("rate_wbytes", _N),
        "corruptedFiles": ("corrupted_files", _S),
        "meanCoreCount": ("mean_core_count", _I),
        "cpu_architecture_level": ("cpu_architecture_level", _S),
        "grid": ("grid", _S),
        "source_site": ("source_site", _S),
        "destination_site": ("destination_site", _S),
        "timeout": ("timeout", _I),
    },
    ("job_id", "job_status"),
)

ACQUIRE_EVENT_RANGES = Endpoint(
    "event/acquire_event_ranges",
    "POST",
    {
        "pandaID": ("job_id", _I),
        "jobsetID": ("jobset_id", _I),
        "taskID": ("task_id", _I),
        "nRanges": ("n_ranges", _I),
        "timeout": ("timeout", _I),
        "scattered": ("scattered", _B),
        "segment_id": ("segment_id", _I),
    },
    ("job_id", "jobset_id"),
)

UPDATE_EVENT_RANGES = Endpoint(
    "event/update_event_ranges",
    "POST",
    {
        "eventRanges": ("event_ranges", Kind.JSON_STR),
        "timeout": ("timeout", _I),
        "version": ("version", _I),
    },
    ("event_ranges",),
)

UPDATE_SINGLE_EVENT_RANGE = Endpoint(
    "event/update_single_event_range",
    "POST",
    {
        "eventRangeID": ("event_range_id", _S),
        "eventStatus": ("event_range_status", _S),
        "coreCount": ("core_count", _I),
        "cpuConsumptionTime": ("cpu_consumption_time", _F),
        # objstoreID -> object_store_id is annotated with the builtin `id`: any
        # value but null is an HTTP 500 on the server, so it is never sent
        "timeout": ("timeout", _I),
    },
    ("event_range_id", "event_range_status"),
)

GET_EVENT_RANGE_STATUSES = Endpoint(
    "event/get_event_range_statuses",
    "GET",
    {"ids": ("job_task_ids", Kind.JSON_STR)},
    ("job_task_ids",),
)

GET_JOB_STATUS = Endpoint("pilot/get_job_status", "GET", {"ids": ("job_ids", Kind.ANY)})

#: legacy method -> its v1 successor
ENDPOINTS: dict[str, Endpoint] = {
    "getJob": ACQUIRE_JOBS,
    "updateJob": UPDATE_JOB,
    "getEventRanges": ACQUIRE_EVENT_RANGES,
    "updateEventRanges": UPDATE_EVENT_RANGES,
    "updateEventRange": UPDATE_SINGLE_EVENT_RANGE,
    "get_events_status": GET_EVENT_RANGE_STATUSES,
    "getStatus": GET_JOB_STATUS,
}

#: v1 path -> legacy method (what ``pilot serve`` answers v1 calls with)
BY_PATH: dict[str, str] = {e.path: m for m, e in ENDPOINTS.items()}


class ConversionError(ValueError):
    """A value that cannot have the type the server requires."""


def _as_int(value: Any) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    number = float(str(value).strip())
    if not math.isfinite(number):
        raise ValueError(f"{value!r} is not finite")
    return int(round(number))


def _as_number(value: Any) -> int | float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    text = str(value).strip()
    try:
        return int(text)
    except ValueError:
        return float(text)


def _as_time(value: Any) -> str:
    """Epoch seconds (older spool files, other pilots) become PanDA's time format."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return panda_time(float(value))
    text = str(value).strip()
    try:
        return panda_time(float(text))
    except ValueError:
        time.strptime(text, PANDA_TIME)  # ValueError when it is not PanDA's format either
        return text


def convert(kind: Kind, value: Any) -> Any:
    """``value`` as the JSON type of ``kind``; ConversionError when it cannot be."""
    try:
        if kind is Kind.INT:
            return _as_int(value)
        if kind is Kind.FLOAT:
            return float(value)
        if kind is Kind.NUMBER:
            return _as_number(value)
        if kind is Kind.BOOL:
            return value if isinstance(value, bool) else str(value).lower() in ("true", "1")
        if kind is Kind.TIME:
            return _as_time(value)
        if kind is Kind.JSON_STR:
            return value if isinstance(value, str) else json.dumps(value)
        if kind is Kind.STR:
            if isinstance(value, (dict, list)):
                return json.dumps(value)
            return str(value)
        return value
    except (TypeError, ValueError) as exc:
        raise ConversionError(f"{value!r:.60} is not a valid {kind.value}: {exc}") from None


def to_v1(method: str, fields: dict[str, Any]) -> tuple[Endpoint, dict[str, Any], list[str]]:
    """The v1 endpoint and parameters of a legacy call, and the legacy fields left out.

    Absent values (None, "", "NULL") are left out too: every optional v1
    parameter defaults to None, which is what an absent legacy value meant.
    A value of the wrong type for a required parameter is a ConversionError;
    for an optional one it is left out (and named in the dropped list), as
    the server itself only logs such values.
    """
    endpoint = ENDPOINTS[method]
    params: dict[str, Any] = {}
    dropped: list[str] = []
    for key, value in fields.items():
        spec = endpoint.params.get(key)
        if spec is None:
            dropped.append(key)
            continue
        name, kind = spec
        if not isinstance(value, (list, dict)) and value in NULLS:
            continue
        try:
            params[name] = convert(kind, value)
        except ConversionError:
            if name in endpoint.required:
                raise
            dropped.append(key)
    missing = [name for name in endpoint.required if name not in params]
    if missing:
        raise ConversionError(f"{method} needs {', '.join(missing)}")
    return endpoint, params, dropped


# -- answers ------------------------------------------------------------------------------

NO_JOBS_MESSAGE = "No jobs in PanDA"
_TIMEOUT_MESSAGES = ("Timed out", "TimeOut")


def _status(envelope: dict[str, Any]) -> int:
    data = envelope.get("data")
    if isinstance(data, dict) and "StatusCode" in data:
        try:
            return int(data["StatusCode"])
        except (TypeError, ValueError):
            return 30
    if envelope.get("message") in _TIMEOUT_MESSAGES:
        return 10
    return 30


def is_envelope(body: Any) -> bool:
    return isinstance(body, dict) and "success" in body and "data" in body


def from_v1(method: str, envelope: dict[str, Any]) -> dict[str, Any]:
    """A v1 answer in the legacy form: ``StatusCode`` and the legacy keys.

    ``success`` alone is not enough: ``update_job`` answers a database
    failure with ``success: true`` and the outcome in ``data.StatusCode``;
    ``update_single_event_range`` answers ``success: null`` for a non-final
    status that it accepted.
    """
    success = envelope.get("success")
    message = str(envelope.get("message") or "")
    data = envelope.get("data")
    if method == "getJob":
        if success is True and isinstance(data, dict):
            jobs = data.get("jobs") or []
            if not jobs:
                return {"StatusCode": 20, "errorDialog": NO_JOBS_MESSAGE}
            job = dict(jobs[0])
            job["StatusCode"] = 0
            return job
        if message == NO_JOBS_MESSAGE:
            return {"StatusCode": 20, "errorDialog": message}
        return {"StatusCode": _status(envelope), "errorDialog": message}
    if method == "updateJob":
        body = dict(data) if isinstance(data, dict) else {}
        status = _status(envelope) if "StatusCode" in body or success is not True else 0
        body["StatusCode"] = 30 if success is not True and status == 0 else status
        if message:
            body["errorDialog"] = message
        command = body.get("command")
        body["command"] = "NULL" if command in (None, "") else str(command)
        return body
    if method == "getEventRanges":
        if success is True:
            return {"StatusCode": 0, "eventRanges": data if data is not None else []}
        return {"StatusCode": _status(envelope), "errorDialog": message}
    if method == "updateEventRanges":
        if success is True and isinstance(data, dict):
            return {
                "StatusCode": 0,
                "Returns": data.get("Returns"),
                "Command": data.get("Commands", data.get("Command")),
            }
        return {"StatusCode": _status(envelope), "errorDialog": message}
    if method == "updateEventRange":
        if success is False:
            return {"StatusCode": _status(envelope), "errorDialog": message}
        command = data.get("Command") if isinstance(data, dict) else None
        return {"StatusCode": 0, "Command": command}
    if method == "get_events_status":
        if success is True and isinstance(data, dict):
            return {"StatusCode": 0, "statuses": data}
        return {"StatusCode": _status(envelope), "errorDialog": message}
    if success is True:
        return {"StatusCode": 0, "data": data}
    return {"StatusCode": _status(envelope), "errorDialog": message}


def is_forbidden(http_status: int, text: str) -> bool:
    """The answer of a server that does not have the method (an old one, for v1)."""
    return http_status == 403 and "is forbidden" in text
