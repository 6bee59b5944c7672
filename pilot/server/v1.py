"""The dispatcher's ``/api/v1`` pilot API, answered as the current PanDA server answers it.

docs/DESIGN.md: the embedded dispatcher is a stand-in for the real server,
so a pilot tested against it meets the same rules. Request handling follows
the server's (panda-server 1.0, ``pandaserver/server/panda.py`` and the
``request_validation`` decorator of ``pandaserver/api/v1/common.py``):

- ``/api/v1/<module>/<function>``; anything else, or a function this
  dispatcher does not have, is HTTP 403 ``ERROR : method <f> is forbidden``;
- JSON when ``Content-Type`` or ``Accept`` is exactly ``application/json``,
  else the Python repr of the answer; the answer's Content-Type is
  ``text/plain`` either way;
- POST bodies are JSON (``Content-Type: application/json``, gzip allowed
  with ``Content-Encoding: gzip``) or a form; GET parameters come from the
  query string, a repeated key becoming a list;
- then, in this order, the HTTP method, the binding of the parameters to
  the function's signature (a missing or unknown parameter is an
  ``Argument error``) and each annotated parameter's type (GET values are
  cast; POST values must already have the JSON type): failures are HTTP 200
  ``{"success": false, "message": ...}``; an exception is HTTP 500 with its
  text.

The functions' signatures below are the server's, annotations included,
since the checks run on them. A quirk of the real server is reproduced on
request (``quirks``): ``update_event_ranges_500`` answers HTTP 500 after the
ranges were written, as panda-server 1.0.4 does.
"""

import inspect
import json
import zlib
from collections.abc import Callable
from typing import Any, Union, get_args, get_origin
from urllib.parse import parse_qs

from pilot.comm.pandaapi import UPDATE_JOB
from pilot.server.db import RANGE_STATES, Store
from pilot.server.wire import MAX_BODY, BadRequest, panda_value, read_body

QUIRK_UPDATE_EVENT_RANGES_500 = "update_event_ranges_500"
QUIRKS = frozenset({QUIRK_UPDATE_EVENT_RANGES_500})
JOB_STATES = ("running", "failed", "finished", "holding", "starting", "transferring")
NO_JOBS = "No jobs in PanDA"
DATABASE_ERROR = "database error in the PanDA server"
#: job definition keys the server sends as JSON numbers (the rest are strings)
_NUMERIC_KEYS = frozenset(
    {
        "PandaID",
        "jobsetID",
        "jobDefinitionID",
        "attemptNr",
        "currentPriority",
        "coreCount",
        "maxCpuCount",
        "minRamCount",
        "maxDiskCount",
        "maxWalltime",
        "taskID",
    }
)
_LEGACY_UPDATE_NAMES = {v1: legacy for legacy, (v1, _) in UPDATE_JOB.params.items()}

Answer = tuple[int, bytes, str]


def envelope(success: Any, message: str = "", data: Any = None) -> dict[str, Any]:
    return {"success": success, "message": message, "data": data}


class V1Error(Exception):
    """HTTP 403/500 with a text/plain body, as the server's entry point answers."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


# -- the functions, with the server's signatures ---------------------------------------------
# ``req`` is the handler: its store and options.


def acquire_jobs(
    req: "V1Handler",
    site_name: str,
    timeout: int = 60,
    memory: int = None,
    disk_space: int = None,
    prod_source_label: str = None,
    node: str = None,
    computing_element: str = None,
    prod_user_id: str = None,
    get_proxy_key: str = None,
    task_id: int = None,
    n_jobs: int = 1,
    background: bool = None,
    resource_type: str = None,
    harvester_id: str = None,
    worker_id: int = None,
    scheduler_id: str = None,
    job_type: str = None,
    via_topic: bool = None,
    remaining_time=None,
) -> dict[str, Any]:
    jobs = []
    for _ in range(max(1, n_jobs)):
        job = req.store.dispatch_job(site_name, (node or "")[:256])
        if job is None:
            break
        jobs.append(_job_answer(job))
    if not jobs:
        return envelope(False, NO_JOBS)
    return envelope(True, data={"StatusCode": 0, "jobs": jobs})


def update_job(
    req: "V1Handler",
    job_id: int,
    job_status: str,
    job_output_report: str = "",
    node: str = None,
    cpu_consumption_time: int = None,
    cpu_consumption_unit: str = None,
    scheduler_id: str = None,
    pilot_id: str = None,
    site_name: str = None,
    pilot_log: str = "",
    meta_data: str = "",
    cpu_conversion_factor: Union[float, int] = None,
    trans_exit_code: int = None,
    pilot_error_code: int = None,
    pilot_error_diag: str = None,
    exe_error_code: int = None,
    exe_error_diag: str = None,
    pilot_timing: str = None,
    start_time: str = None,
    end_time: str = None,
    n_events: int = None,
    n_input_files: int = None,
    batch_id: str = None,
    attempt_nr: int = None,
    job_metrics: str = None,
    stdout: str = "",
    job_sub_status: str = None,
    core_count: int = None,
    max_rss: Union[int, float] = None,
    max_vmem: Union[int, float] = None,
    max_swap: Union[int, float] = None,
    max_pss: Union[int, float] = None,
    avg_rss: Union[int, float] = None,
    avg_vmem: Union[int, float] = None,
    avg_swap: Union[int, float] = None,
    avg_pss: Union[int, float] = None,
    tot_rchar: Union[int, float] = None,
    tot_wchar: Union[int, float] = None,
    tot_rbytes: Union[int, float] = None,
    tot_wbytes: Union[int, float] = None,
    rate_rchar: Union[int, float] = None,
    rate_wchar: Union[int, float] = None,
    rate_rbytes: Union[int, float] = None,
    rate_wbytes: Union[int, float] = None,
    corrupted_files: str = None,
    mean_core_count: int = None,
    cpu_architecture_level: str = None,
    grid: str = None,
    source_site: str = None,
    destination_site: str = None,
    timeout: int = 60,
) -> dict[str, Any]:
    if job_status not in JOB_STATES:
        return envelope(False, f"Invalid job status: {job_status}", {"StatusCode": 50})
    given = {k: v for k, v in locals().items() if k not in ("req", "timeout") and v not in ("",)}
    # the audit trail keeps updateJob's names and form values, whichever API carried it
    fields = {
        _LEGACY_UPDATE_NAMES.get(k, k): panda_value(v) for k, v in given.items() if v is not None
    }
    result = req.store.update_job(job_id, job_status, fields)
    if result.disposition == "unknown":
        # the server tells the pilot of a job it does not know to stop
        return envelope(True, data={"StatusCode": 0, "command": "tobekilled"})
    # panda-server 1.0.4 sends "NULL" (a string) when it has no command for the pilot, and
    # "alreadydone" to a final update of a job whose final state it has already
    command = "alreadydone" if result.disposition == "duplicate" else result.command or "NULL"
    return envelope(True, data={"StatusCode": result.status_code, "command": command})


def get_job_status(req: "V1Handler", job_ids: list[int], timeout: int = 60) -> dict[str, Any]:
    out = []
    for panda_id in job_ids:
        record = req.store.job(panda_id)
        out.append(
            {
                "job_id": panda_id,
                "status": record["status"] if record else "not found",
                "attempt_number": record["attempt_nr"] if record else 0,
            }
        )
    return envelope(True, data=out)


def acquire_event_ranges(
    req: "V1Handler",
    job_id: int,
    jobset_id: int,
    task_id: int = None,
    n_ranges: int = 10,
    timeout: int = 60,
    scattered: bool = False,
    segment_id: int = None,
) -> dict[str, Any]:
    ranges = req.store.dispatch_ranges(job_id, max(0, min(n_ranges, 100_000)))
    if ranges is None:
        return envelope(False, DATABASE_ERROR)
    return envelope(True, data=ranges)


def update_event_ranges(
    req: "V1Handler", event_ranges: str, timeout: int = 120, version: int = 0
) -> dict[str, Any]:
    try:
        value = json.loads(event_ranges)
    except ValueError as exc:
        raise V1Error(500, f"unhashable type: 'list' ({exc})") from None
    entries = []
    for item in value if isinstance(value, list) else [value]:
        inner = item.get("eventRanges") if isinstance(item, dict) and version != 0 else None
        entries.extend(inner if isinstance(inner, list) else [item])
    good = [i for i, e in enumerate(entries) if _valid_entry(e)]
    returns: list[Any] = [False] * len(entries)
    accepted, commands = req.store.update_ranges([entries[i] for i in good])
    for i, ok in zip(good, accepted):
        # like the server: None for a status it does not record (running)
        returns[i] = ok if entries[i]["eventStatus"] != "running" else None
    if QUIRK_UPDATE_EVENT_RANGES_500 in req.quirks:
        # panda-server 1.0.4 builds a set where it meant a dict, after the write
        data = {"Returns", json.dumps(returns), "Commands", json.dumps(commands)}
        raise V1Error(500, f"Type not serializable for {data} (<class 'set'>)")
    return envelope(True, data={"Returns": json.dumps(returns), "Commands": json.dumps(commands)})


def update_single_event_range(
    req: "V1Handler",
    event_range_id: str,
    event_range_status: str,
    core_count: int = None,
    cpu_consumption_time: float = None,
    object_store_id: id = None,  # the server's annotation: any value but null is an HTTP 500
    timeout: int = 60,
) -> dict[str, Any]:
    entry = {"eventRangeID": event_range_id, "eventStatus": event_range_status}
    if cpu_consumption_time is not None:
        entry["cpuConsumptionTime"] = cpu_consumption_time
    if not _valid_entry(entry):
        return envelope(False, f"unknown status {event_range_status}")
    (ok,), commands = req.store.update_ranges([entry])
    success = None if event_range_status == "running" and ok else ok
    return envelope(success, data={"Command": json.dumps(commands)})


def get_available_event_range_count(
    req: "V1Handler", job_id: int, jobset_id: int, task_id: int, timeout=60
) -> dict[str, Any]:
    rows = req.store.query(
        "SELECT COUNT(*) AS n FROM ranges r JOIN jobs j ON j.panda_id = r.panda_id"
        " AND j.attempt_nr = r.attempt_nr WHERE r.panda_id = ? AND r.status = 'ready'",
        (job_id,),
    )
    return envelope(True, data=int(rows[0]["n"]))


def get_event_range_statuses(req: "V1Handler", job_task_ids: str) -> dict[str, Any]:
    try:
        ids = json.loads(job_task_ids)
        panda_ids = [int(item["panda_id"]) for item in ids]
    except (ValueError, TypeError, KeyError):
        return envelope(False, DATABASE_ERROR)
    out: dict[str, Any] = {}
    for panda_id in panda_ids:
        rows = req.store.query(
            "SELECT range_id, status, error_code, error_diag FROM ranges WHERE panda_id = ?",
            (panda_id,),
        )
        out[str(panda_id)] = {
            r["range_id"]: {
                "status": r["status"],
                "error": r["error_code"],
                "dialog": r["error_diag"],
            }
            for r in rows
        }
    return envelope(True, data=out)


def is_alive(req: "V1Handler") -> dict[str, Any]:
    return envelope(True)


#: (module, function) -> (function, HTTP method, needs the pilot's credentials)
FUNCTIONS: dict[tuple[str, str], tuple[Callable[..., dict[str, Any]], str, bool]] = {
    ("pilot", "acquire_jobs"): (acquire_jobs, "POST", True),
    ("pilot", "update_job"): (update_job, "POST", True),
    ("pilot", "get_job_status"): (get_job_status, "GET", True),
    ("event", "acquire_event_ranges"): (acquire_event_ranges, "POST", True),
    ("event", "update_event_ranges"): (update_event_ranges, "POST", True),
    ("event", "update_single_event_range"): (update_single_event_range, "POST", True),
    ("event", "get_available_event_range_count"): (get_available_event_range_count, "GET", True),
    ("event", "get_event_range_statuses"): (get_event_range_statuses, "GET", True),
    ("system", "is_alive"): (is_alive, "GET", False),
}
_SIGNATURES = {key: inspect.signature(fn) for key, (fn, _, _) in FUNCTIONS.items()}


def _valid_entry(e: Any) -> bool:
    return (
        isinstance(e, dict)
        and isinstance(e.get("eventRangeID"), str)
        and 0 < len(e["eventRangeID"]) <= 256
        and e.get("eventStatus") in RANGE_STATES
    )


def _job_answer(job: dict[str, Any]) -> dict[str, Any]:
    """A job as ``acquire_jobs`` sends it: numbers as numbers, the rest as strings."""
    out: dict[str, Any] = {}
    for key, value in job.items():
        if key in _NUMERIC_KEYS:
            try:
                out[key] = int(str(value))
                continue
            except ValueError:
                pass
        out[key] = panda_value(value)
    out["StatusCode"] = 0
    out["nSent"] = 0
    return out


# -- request handling ------------------------------------------------------------------------


def _type_name(t: Any) -> str:
    return t.__name__  # a Union has none: the server fails the same way (HTTP 500)


def _cast_get(value: Any, expected: Any, default: Any) -> Any:
    """A query-string value as the server casts it for GET."""
    origin, args = get_origin(expected), get_args(expected)
    if value == "None" and default is None:
        return None
    if expected is str:
        return value
    if expected is bool:
        return value.lower() in ("true", "1")
    if expected is int:
        return int(float(value))
    if origin is list and args:
        items = [value] if isinstance(value, str) else value
        if args[0] is int:
            return [int(float(i)) for i in items]
        if args[0] is float:
            return [float(i) for i in items]
        return items
    import ast  # noqa: PLC0415 - only for the rare literal parameter

    if not isinstance(value, expected):
        value = ast.literal_eval(value)
    if not isinstance(value, expected):
        raise TypeError(f"Expected {expected}, received {type(value)}")
    return value


def validate(
    signature: inspect.Signature, verb: str, expected_verb: str, params: dict[str, Any]
) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """(None, bound arguments) or (the failure answer, {}): method, binding, types."""
    if verb != expected_verb:
        return envelope(False, f"expecting {expected_verb}, received {verb}"), {}
    try:
        bound = signature.bind(None, **params)
    except TypeError as exc:
        return envelope(False, f"Argument error: {exc}"), {}
    bound.apply_defaults()
    for name, value in list(bound.arguments.items())[1:]:
        parameter = signature.parameters[name]
        expected = parameter.annotation
        if expected is inspect.Parameter.empty or value == parameter.default:
            continue
        if verb == "GET":
            try:
                value = _cast_get(value, expected, parameter.default)
            except (ValueError, TypeError, SyntaxError):
                return envelope(
                    False,
                    f"Type error: '{name}' with value '{value}' could not be casted to type"
                    f" {_type_name(expected)} from {type(value).__name__}.",
                ), {}
            bound.arguments[name] = value
        origin = get_origin(expected)
        if origin is not None and origin is not Union:
            if not isinstance(value, origin):
                return envelope(
                    False,
                    f"Type error: '{name}' must be of type {origin.__name__},"
                    f" got {type(value).__name__}.",
                ), {}
            args = get_args(expected)
            if origin is list and args and not all(isinstance(i, args[0]) for i in value):
                return envelope(
                    False, f"Type error: All elements in '{name}' must be {args[0].__name__}."
                ), {}
        elif not isinstance(value, expected) and not (value is None and parameter.default is None):
            return envelope(
                False,
                f"Type error: '{name}' must be of type {_type_name(expected)},"
                f" got {type(value).__name__}.",
            ), {}
    return None, dict(bound.arguments)


def _params(environ: dict[str, Any], verb: str, max_body: int) -> dict[str, Any]:
    ctype = environ.get("CONTENT_TYPE") or ""
    if verb in ("GET", "HEAD"):
        query = parse_qs(environ.get("QUERY_STRING") or "", keep_blank_values=True)
        return {k: v[0] if len(v) == 1 else v for k, v in query.items()}
    body = read_body(environ, max_body)
    if (environ.get("HTTP_CONTENT_ENCODING") or "").lower() == "gzip":
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            body = inflater.decompress(body, max_body + 1)
        except zlib.error as exc:
            raise V1Error(500, f"ERROR : received invalid JSON : {exc}") from None
        if len(body) > max_body:
            raise BadRequest(413, f"decompressed body exceeds the limit of {max_body} bytes")
    if ctype == "application/json" and verb in ("POST", "PUT"):
        try:
            obj = json.loads(body.decode("utf-8")) if body else {}
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise V1Error(500, f"ERROR : received invalid JSON : {exc}") from None
        if not isinstance(obj, dict):
            raise V1Error(500, "argument after ** must be a mapping, not " + type(obj).__name__)
        return obj
    try:
        form = parse_qs(body.decode("utf-8"), keep_blank_values=True)
    except UnicodeDecodeError as exc:
        raise V1Error(500, str(exc)) from None
    return {k: v[0] if len(v) == 1 else v for k, v in form.items()}


class V1Handler:
    """Answers ``/api/...`` requests from a :class:`Store`. ``check_auth`` raises V1Error(403)."""

    def __init__(
        self,
        store: Store,
        check_auth: Callable[[dict[str, Any]], None],
        *,
        max_body: int = MAX_BODY,
        quirks: frozenset[str] = frozenset(),
    ) -> None:
        unknown = set(quirks) - QUIRKS
        if unknown:
            raise ValueError(f"unknown quirks {sorted(unknown)}: known are {sorted(QUIRKS)}")
        self.store = store
        self.check_auth = check_auth
        self.max_body = max_body
        self.quirks = frozenset(quirks)

    def __call__(self, environ: dict[str, Any]) -> Answer:
        json_app = (
            environ.get("CONTENT_TYPE") == "application/json"
            or environ.get("HTTP_ACCEPT") == "application/json"
        )
        try:
            result = self._dispatch(environ)
        except V1Error as exc:
            return exc.status, exc.text.encode("utf-8"), "text/plain"
        except BadRequest as exc:
            return exc.status, f"ERROR : {exc.reason}".encode(), "text/plain"
        try:
            text = json.dumps(result) if json_app else str(result)
        except TypeError as exc:
            return 500, str(exc).encode("utf-8"), "text/plain"
        return 200, text.encode("utf-8"), "text/plain"

    def _dispatch(self, environ: dict[str, Any]) -> dict[str, Any]:
        path = environ.get("PATH_INFO") or ""
        fields = path.split("/")
        name = fields[-1] if fields else ""
        key = (fields[3], fields[4]) if len(fields) == 5 and fields[2] == "v1" else None
        if key not in FUNCTIONS:
            raise V1Error(403, f"ERROR : method {name} is forbidden")
        function, expected_verb, needs_auth = FUNCTIONS[key]
        if needs_auth or environ.get("HTTP_AUTHORIZATION"):
            self.check_auth(environ)
        verb = environ.get("REQUEST_METHOD", "GET")
        params = _params(environ, verb, self.max_body)
        try:
            failure, arguments = validate(_SIGNATURES[key], verb, expected_verb, params)
            if failure is not None:
                return failure
            arguments.pop("req", None)
            return function(self, **arguments)
        except V1Error:
            raise
        except Exception as exc:  # the server's answer to any exception in a function
            raise V1Error(500, str(exc)) from None
