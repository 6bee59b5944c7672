"""The embedded PanDA-compatible dispatcher as a WSGI application.

Paths and names are PanDA's: ``/server/panda/<method>`` for the pilot's calls,
``/cache/schedconfig/<queue>.all.json`` for the queue description, and a
Rucio-like ``/traces/`` that records file-transfer traces. ``/admin/...``
loads jobs and tasks, cancels and retries jobs and reports status; it always
needs the bearer token. The pilot's calls need it too (``require_pilot_token``,
on loopback as well), sent as PanDA's token authentication sends it:
``Authorization: Bearer <token>``; a call without it gets 403 and changes
nothing. Traces need it only from beyond loopback.

Every failure is an answer: a refused request gets a 4xx with the reason in
``errorDialog`` (and PanDA's ``StatusCode``), a database failure a 500; no
request can stop the server.
"""

from __future__ import annotations

import hmac
import logging
import re
import sqlite3
from collections.abc import Callable, Iterable
from typing import Any

from pilot.credentials import is_loopback
from pilot.queue import QueueConfig
from pilot.server import loading
from pilot.server.db import MAX_RANGES_PER_CALL, RANGE_STATES, REPORTED_STATES, Store, StoreError
from pilot.server.v1 import V1Error, V1Handler, get_event_range_statuses
from pilot.server.wire import (
    MAX_BODY,
    BadRequest,
    decode_params,
    encode_answer,
    int_param,
    json_param,
    panda_value,
    read_json,
    str_param,
    wants_json,
)

log = logging.getLogger(__name__)

_QUEUE_PATH = re.compile(r"^/cache/schedconfig/([A-Za-z0-9_.\-]{1,128}?)(\.all)?\.json$")
_ADMIN_JOB = re.compile(r"^/admin/jobs/([0-9]{1,18})$")
_REASONS = {
    200: "OK",
    201: "Created",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Payload Too Large",
    415: "Unsupported Media Type",
    500: "Internal Server Error",
}

StartResponse = Callable[[str, list[tuple[str, str]]], Any]
Answer = tuple[int, dict[str, Any]]


class DispatcherApp:
    """WSGI callable. Thread-safe: all state is in the :class:`Store`."""

    def __init__(
        self,
        store: Store,
        *,
        token: str,
        require_pilot_token: bool = True,
        max_body: int = MAX_BODY,
        default_queues: bool = True,
        quirks: frozenset[str] = frozenset(),
        legacy_only: bool = False,
    ) -> None:
        if not token:
            raise ValueError("the dispatcher needs an admin token")
        self.store = store
        self._token = token
        self.require_pilot_token = require_pilot_token
        self.max_body = max_body
        self.default_queues = default_queues
        self._panda: dict[str, Callable[[dict[str, Any]], Answer]] = {
            "getJob": self._get_job,
            "updateJob": self._update_job,
            "getEventRanges": self._get_event_ranges,
            "updateEventRanges": self._update_event_ranges,
            "updateEventRange": self._update_event_range,
            "get_events_status": self._get_events_status,
        }
        self.legacy_only = legacy_only
        self._v1 = V1Handler(store, self._check_v1_token, max_body=max_body, quirks=quirks)

    # -- WSGI ---------------------------------------------------------------------------

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if (environ.get("PATH_INFO") or "").startswith("/api/"):
            if self.legacy_only:  # what a server from before /api/v1 answers
                name = (environ.get("PATH_INFO") or "").rsplit("/", 1)[-1]
                status, body, ctype = (
                    403,
                    f"ERROR : method {name} is forbidden".encode(),
                    "text/plain",
                )
            else:
                status, body, ctype = self._v1(environ)
            start_response(
                f"{status} {_REASONS.get(status, 'Error')}",
                [("Content-Type", ctype), ("Content-Length", str(len(body)))],
            )
            return [body]
        # PanDA's methods answer in the encoding asked for; everything else speaks JSON.
        as_json = wants_json(environ) or not (environ.get("PATH_INFO") or "").startswith("/server/")
        try:
            status, answer = self._route(environ)
        except BadRequest as exc:
            status = exc.status
            answer = {"StatusCode": exc.status_code, "errorDialog": exc.reason}
        except sqlite3.Error as exc:
            log.error("database error on %s: %s", environ.get("PATH_INFO"), exc)
            status, answer = 500, {"StatusCode": 30, "errorDialog": "database error"}
        body, ctype = encode_answer(answer, as_json)
        start_response(
            f"{status} {_REASONS.get(status, 'Error')}",
            [("Content-Type", ctype), ("Content-Length", str(len(body)))],
        )
        return [body]

    def _route(self, environ: dict[str, Any]) -> Answer:
        path = environ.get("PATH_INFO") or "/"
        verb = environ.get("REQUEST_METHOD", "GET")
        if path.startswith("/server/panda/"):
            method = path[len("/server/panda/") :]
            handler = self._panda.get(method)
            if handler is None:
                raise BadRequest(404, f"unknown method {method[:64]!r}")
            if verb not in ("POST", "GET"):
                raise BadRequest(405, f"{verb} is not allowed")
            if self.require_pilot_token:
                self._check_token(environ)
            return handler(decode_params(environ, self.max_body))
        m = _QUEUE_PATH.match(path)
        if m:
            if verb != "GET":
                raise BadRequest(405, "schedconfig is read with GET")
            return self._schedconfig(m.group(1), wrapped=m.group(2) is None)
        if path == "/cache/ddmendpoints.json":
            if verb != "GET":
                raise BadRequest(405, "storage descriptions are read with GET")
            return 200, self.store.storages()
        if path.rstrip("/") == "/traces":
            if verb != "POST":
                raise BadRequest(405, "traces are sent with POST")
            if self.require_pilot_token and not is_loopback(environ.get("REMOTE_ADDR") or ""):
                self._check_token(environ)
            return self._traces(read_json(environ, self.max_body))
        if path.startswith("/admin/"):
            self._check_token(environ)
            return self._admin(verb, path, environ)
        if path in ("/", "/healthz"):
            return 200, {"StatusCode": 0, "service": "pilot dispatcher"}
        raise BadRequest(404, f"no such path {path[:64]!r}")

    def _check_token(self, environ: dict[str, Any]) -> None:
        header = environ.get("HTTP_AUTHORIZATION") or ""
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise BadRequest(403, "a bearer token is required", status_code=50)
        if not hmac.compare_digest(value.strip().encode(), self._token.encode()):
            raise BadRequest(403, "invalid token", status_code=50)

    def _check_v1_token(self, environ: dict[str, Any]) -> None:
        """The v1 API's answer to a missing or wrong token: 403 text/plain, as PanDA's."""
        if not self.require_pilot_token:
            return
        try:
            self._check_token(environ)
        except BadRequest as exc:
            raise V1Error(403, f"ERROR : Token authentication failed. {exc.reason}") from None

    # -- PanDA methods --------------------------------------------------------------------

    def _get_job(self, p: dict[str, Any]) -> Answer:
        site = str_param(p, "siteName")
        node = str_param(p, "node", default="")[:256]
        job = self.store.dispatch_job(site, node)
        if job is None:
            return 200, {"StatusCode": 20, "errorDialog": "no jobs"}
        answer = {k: panda_value(v) for k, v in job.items()}
        answer["StatusCode"] = 0
        return 200, answer

    def _update_job(self, p: dict[str, Any]) -> Answer:
        panda_id = int_param(p, "jobId", minimum=1)
        state = str_param(p, "state")
        if state not in REPORTED_STATES:
            raise BadRequest(400, f"unknown state {state[:32]!r}")
        fields = {k: v for k, v in p.items() if isinstance(k, str)}
        result = self.store.update_job(panda_id, state, fields)
        answer: dict[str, Any] = {"StatusCode": result.status_code, "command": result.command}
        if result.error:
            answer["errorDialog"] = result.error
        return 200, answer

    def _get_event_ranges(self, p: dict[str, Any]) -> Answer:
        panda_id = int_param(p, "pandaID", minimum=1)
        n = int_param(p, "nRanges", default=1, minimum=1)
        if n > MAX_RANGES_PER_CALL:
            raise BadRequest(400, f"nRanges {n} exceeds {MAX_RANGES_PER_CALL}")
        ranges = self.store.dispatch_ranges(panda_id, n)
        if ranges is None:
            return 200, {"StatusCode": 30, "errorDialog": f"job {panda_id} not found"}
        return 200, {"StatusCode": 0, "eventRanges": ranges}

    def _update_event_ranges(self, p: dict[str, Any]) -> Answer:
        version = int_param(p, "version", default=0)
        if version not in (0, 1):
            raise BadRequest(400, f"unknown version {version}")
        entries = _flatten(json_param(p, "eventRanges"))
        returns, commands = self.store.update_ranges(entries)
        return 200, {"StatusCode": 0, "Returns": returns, "Commands": commands}

    def _update_event_range(self, p: dict[str, Any]) -> Answer:
        entry = {
            "eventRangeID": str_param(p, "eventRangeID"),
            "eventStatus": str_param(p, "eventStatus"),
        }
        for key in ("errorCode", "errorDiag", "cpuConsumptionTime"):
            if key in p:
                entry[key] = p[key]
        _check_entry(entry)
        returns, commands = self.store.update_ranges([entry])
        answer: dict[str, Any] = {"StatusCode": 0 if returns[0] else 30, "Commands": commands}
        if not returns[0]:
            answer["errorDialog"] = "range not dispatched to this attempt, or already done"
        return 200, answer

    def _get_events_status(self, p: dict[str, Any]) -> Answer:
        """The legacy method answers the bare ``{PandaID: {eventRangeID: {...}}}``."""
        answer = get_event_range_statuses(self._v1, str_param(p, "ids"))
        if not answer["success"]:
            raise BadRequest(400, answer["message"])
        return 200, answer["data"]

    # -- queue description and traces -----------------------------------------------------

    def _schedconfig(self, name: str, wrapped: bool) -> Answer:
        """PanDA's ``<queue>.all.json`` is the bare queue; CRIC's ``<queue>.json`` wraps it
        as ``{queue: {...}}`` (what the PanDA pilot reads from ``$LOCAL_AGIS_SCHEDCONF``)."""
        config = self.store.get_queue(name)
        if config is None:
            if not self.default_queues:
                raise BadRequest(404, f"unknown queue {name}")
            config = QueueConfig.default(name).to_dict()
        # the PanDA pilot takes its site name from CRIC's atlas_site
        config.setdefault("atlas_site", config.get("site") or name)
        return 200, {name: config} if wrapped else config

    def _traces(self, body: Any) -> Answer:
        items = body if isinstance(body, list) else [body]
        if not items or not all(isinstance(t, dict) for t in items):
            raise BadRequest(400, "a trace is a JSON object (or a list of them)")
        if len(items) > 10_000:
            raise BadRequest(413, "at most 10000 traces per call")
        n = self.store.add_traces(items)
        return 201, {"StatusCode": 0, "recorded": n}

    # -- administration -------------------------------------------------------------------

    def _admin(self, verb: str, path: str, environ: dict[str, Any]) -> Answer:
        m = _ADMIN_JOB.match(path)
        if m and verb == "GET":
            record = self.store.job(int(m.group(1)))
            if record is None:
                raise BadRequest(404, f"job {m.group(1)} not found")
            record["updates"] = self.store.updates(int(m.group(1)))
            record["ranges"] = self.store.range_counts(int(m.group(1)))
            return 200, {"StatusCode": 0, "job": record}
        if path == "/admin/status" and verb == "GET":
            return 200, {"StatusCode": 0, "jobs": self.store.summary()}
        if verb != "POST":
            raise BadRequest(405 if path in _ADMIN_POSTS else 404, f"{verb} {path[:64]}")
        body = read_json(environ, self.max_body)
        try:
            if path == "/admin/jobs":
                jobs = body if isinstance(body, list) else [body]
                return 201, {"StatusCode": 0, "PandaIDs": loading.load_jobs(self.store, jobs)}
            if path == "/admin/tasks":
                return 201, {"StatusCode": 0, **loading.load_task(self.store, body)}
            if path == "/admin/cancel":
                panda_id = int_param(body if isinstance(body, dict) else {}, "PandaID", minimum=1)
                outcome = self.store.cancel_job(panda_id)
                if outcome is None:
                    raise BadRequest(404, f"job {panda_id} not found")
                return 200, {"StatusCode": 0, "PandaID": panda_id, "outcome": outcome}
            if path == "/admin/retry":
                panda_id = int_param(body if isinstance(body, dict) else {}, "PandaID", minimum=1)
                attempt = self.store.retry_job(panda_id)
                if attempt is None:
                    raise BadRequest(404, f"job {panda_id} not found")
                return 200, {"StatusCode": 0, "PandaID": panda_id, "attemptNr": attempt}
            if path == "/admin/storages":
                return 201, {"StatusCode": 0, "storages": loading.load_storages(self.store, body)}
            if path == "/admin/queues":
                return 201, {"StatusCode": 0, "queue": loading.load_queue(self.store, body)}
        except StoreError as exc:
            raise BadRequest(409 if "exists" in str(exc) else 400, str(exc)) from None
        raise BadRequest(404, f"no such path {path[:64]!r}")


_ADMIN_POSTS = (
    "/admin/jobs",
    "/admin/tasks",
    "/admin/cancel",
    "/admin/retry",
    "/admin/queues",
    "/admin/storages",
)


def _check_entry(e: Any) -> None:
    if not isinstance(e, dict):
        raise BadRequest(400, f"an event range update must be an object, got {type(e).__name__}")
    rid, status = e.get("eventRangeID"), e.get("eventStatus")
    if not isinstance(rid, str) or not rid or len(rid) > 256:
        raise BadRequest(400, f"bad eventRangeID {str(rid)[:64]!r}")
    if status not in RANGE_STATES:
        raise BadRequest(400, f"bad eventStatus {str(status)[:32]!r} for {rid}")


def _flatten(value: Any) -> list[dict[str, Any]]:
    """v0 entries as they are; v1 ``{zipFile|esOutput, eventRanges: [...]}`` groups unrolled."""
    if not isinstance(value, list):
        raise BadRequest(400, "'eventRanges' must be a JSON list")
    out: list[dict[str, Any]] = []
    for item in value:
        if isinstance(item, dict) and isinstance(item.get("eventRanges"), list):
            out.extend(item["eventRanges"])
        else:
            out.append(item)
        if len(out) > MAX_RANGES_PER_CALL:
            raise BadRequest(413, f"at most {MAX_RANGES_PER_CALL} ranges per call")
    for e in out:
        _check_entry(e)
    return out
