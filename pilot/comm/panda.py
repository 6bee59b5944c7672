"""PanDA server client and the PanDA upstream (docs/DESIGN.md).

Two APIs, one client. A current server (panda-server >= 1.0) speaks only
``/api/v1/<module>/<function>``: JSON bodies with strictly typed parameters
and ``{success, message, data}`` answers (:mod:`pilot.comm.pandaapi` maps
each call). An older one speaks ``/server/panda/<method>``: form-encoded
POSTs with lists and dicts as JSON strings, and a ``StatusCode`` that may
come as an int or a string. ``api="auto"`` (the default) starts with v1 and
falls back to the legacy calls once, for the rest of the run, when the
server answers 403 "is forbidden" for v1, which is how an old server
refuses a method it does not have. Callers always use the legacy names;
answers always come back in the legacy form, so the spool and the workflow
do not care which API carried them.

Transport failures (refused connection, timeout, HTTP 5xx) are retried a
bounded number of times with exponential backoff and full jitter, so a
thousand pilots that lost the server do not come back in step. One
exception: v1 ``update_event_ranges`` answers HTTP 500 *after* it has
written the ranges (the server builds a set where it meant a dict). A blind
resend would report them twice, so the client asks the ranges' statuses
first and resends only what the server does not have. The legacy call has
its own quirk: an exception after its loop appends one ``False`` to the
answers (9 for 8 ranges), and the statuses are asked then too.

Credentials: an X.509 proxy (client certificate, ``proxy=``) and/or an OIDC
bearer token (``token=``), with a CA directory or bundle (``ca_path=``) for
HTTPS. Neither credential is ever logged: log lines name the method and the
server only.

Final job updates that cannot be delivered go to the spool
(:mod:`pilot.comm.spool`), which the server deduplicates.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import requests

from pilot.comm import rangejson
from pilot.comm.pandaapi import (
    ENDPOINTS,
    Api,
    ConversionError,
    from_v1,
    is_envelope,
    is_forbidden,
    to_v1,
)
from pilot.comm.spool import Spool
from pilot.errors import ErrorCode, PilotError
from pilot.job import Job

log = logging.getLogger(__name__)

STATUS_OK = 0
STATUS_NO_JOBS = 20
MAX_RANGES_PER_CALL = 100_000
_RETRY_HTTP = frozenset({429, 500, 502, 503, 504})
_FINAL_RANGE = frozenset({"finished", "failed", "fatal"})
#: server range statuses that show a final update of the pilot was recorded
_RECORDED = {
    "finished": frozenset({"finished", "done", "merged"}),
    "failed": frozenset({"failed", "fatal"}),
    "fatal": frozenset({"failed", "fatal"}),
}


@dataclass(frozen=True)
class ServerReply:
    """One answer of the server: HTTP status and the decoded body (``StatusCode`` an int).

    ``body`` has the legacy form whatever API carried the call; ``envelope``
    is the v1 answer as it came (None for a legacy call).
    """

    http_status: int
    body: dict[str, Any]
    envelope: dict[str, Any] | None = None

    @property
    def status_code(self) -> int:
        return int(self.body.get("StatusCode", -1))

    @property
    def ok(self) -> bool:
        return self.http_status == 200 and self.status_code == STATUS_OK

    @property
    def permanent_failure(self) -> bool:
        """The server understood and refused: sending the same again cannot help.

        Authentication failures (401/403, StatusCode 50/60/70) are not
        permanent: a renewed token or proxy fixes them.
        """
        if self.envelope is not None:
            # v1: a refusal is success false (bad status, type error, unknown parameter);
            # success true with a StatusCode (database error, timeout) may pass
            return self.envelope.get("success") is False and self.status_code != 10
        if self.http_status in (401, 403) or self.status_code in (40, 50, 60, 70, 90):
            return False
        return self.http_status in (400, 404, 409, 413, 415) or (
            self.http_status == 200 and self.status_code not in (STATUS_OK, 10)
        )

    @property
    def error(self) -> str:
        return str(self.body.get("errorDialog") or f"StatusCode {self.body.get('StatusCode')}")


def _form_value(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    if isinstance(value, bool):
        return str(value)
    if value is None:
        return "NULL"
    return str(value)


def _status_code(body: dict[str, Any]) -> int:
    value = body.get("StatusCode")
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        raise PilotError(
            ErrorCode.COMMUNICATIONFAILURE, f"answer has no valid StatusCode: {value!r:.40}"
        ) from None


def token_from_env(environ: dict[str, str] | None = None) -> str | None:
    """The OIDC bearer token as the PanDA pilot finds it.

    ``$OIDC_AUTH_TOKEN`` (or ``$PANDA_AUTH_TOKEN``) names a file, relative to
    ``$OIDC_AUTH_DIR`` (or ``$PANDA_AUTH_DIR``) unless absolute; the file holds
    the token. None when unset or unreadable (then the proxy, if any, is used).
    """
    env = os.environ if environ is None else environ
    name = env.get("OIDC_AUTH_TOKEN") or env.get("PANDA_AUTH_TOKEN")
    if not name:
        return None
    directory = env.get("OIDC_AUTH_DIR") or env.get("PANDA_AUTH_DIR") or ""
    path = name if os.path.isabs(name) else os.path.join(directory, name)
    return read_token_file(path)


def read_token_file(path: str | os.PathLike[str]) -> str | None:
    """The token a file holds (surrounding blanks stripped); None when unreadable or empty."""
    try:
        with open(path, encoding="utf-8") as fh:
            token = fh.read().strip()
    except OSError as exc:
        log.warning("bearer token file %s is unreadable: %s", path, exc.strerror)
        return None
    return token or None


def range_keys(range_id: str) -> tuple[int, int] | None:
    """``(jediTaskID, PandaID)`` of ``<task>-<panda>-<file>-<proc>-<attempt>``."""
    parts = str(range_id).split("-")
    if len(parts) < 5:
        return None
    try:
        return int(parts[0]), int(parts[1])
    except ValueError:
        return None


def flat_ranges(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """v0 entries as they are; v1 ``{zipFile|esOutput, eventRanges: [...]}`` groups unrolled
    (the server answers one result per inner range)."""
    out: list[dict[str, Any]] = []
    for item in entries:
        inner = item.get("eventRanges") if isinstance(item, dict) else None
        out.extend(inner if isinstance(inner, list) else [item])
    return out


class PandaClient:
    """Calls of a PanDA server. Thread-safe for concurrent calls (one session per thread)."""

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        proxy: str | None = None,
        ca_path: str | None = None,
        timeout: float | tuple[float, float] = (10.0, 120.0),
        retries: int = 3,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        session: requests.Session | None = None,
        sleep: Callable[[float], None] = time.sleep,
        auth_origin: str | None = None,
        api: Api | str = Api.AUTO,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise PilotError(ErrorCode.COMMUNICATIONFAILURE, f"server URL {url!r} is not http(s)")
        try:
            self.api = Api(api)
        except ValueError:
            raise PilotError(
                ErrorCode.NOTDEFINED, f"unknown PanDA API {api!r}: v1, legacy or auto"
            ) from None
        self.url = url.rstrip("/")
        for suffix in ("/server/panda", "/api/v1"):  # a URL written with the API path
            self.url = self.url.removesuffix(suffix)
        self.timeout = timeout
        self.retries = max(0, int(retries))
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._sleep = sleep
        self._rng = random.Random()
        self._headers = {"Accept": "application/json"}
        if token:
            self._headers["Authorization"] = f"Bearer {token.strip()}"
        if auth_origin:
            self._headers["Origin"] = auth_origin
        self._proxy = proxy
        self._ca_path = ca_path
        self._given_session = session
        self._local = threading.local()
        self._active = Api.LEGACY if self.api is Api.LEGACY else Api.V1
        self._fallback_lock = threading.Lock()

    @classmethod
    def from_env(cls, url: str, **kwargs: Any) -> PandaClient:
        """A client with the credentials of the environment, as the PanDA pilot takes them:
        bearer token (:func:`token_from_env`), ``$X509_USER_PROXY``, ``$X509_CERT_DIR``."""
        if not kwargs.get("token"):
            kwargs["token"] = token_from_env()
        proxy = os.environ.get("X509_USER_PROXY")
        kwargs.setdefault("proxy", proxy if proxy and os.path.isfile(proxy) else None)
        ca_path = os.environ.get("X509_CERT_DIR")
        kwargs.setdefault("ca_path", ca_path if ca_path and os.path.exists(ca_path) else None)
        kwargs.setdefault("auth_origin", os.environ.get("OIDC_AUTH_ORIGIN") or None)
        return cls(url, **kwargs)

    def __repr__(self) -> str:
        # Never show the credentials.
        return f"PandaClient({self.url!r}, api={self.api.value})"

    @property
    def api_in_use(self) -> Api:
        """V1 or LEGACY: what the next call speaks (auto has chosen once it fell back)."""
        return self._active

    def _session(self) -> requests.Session:
        if self._given_session is not None:
            return self._given_session
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            self._local.session = session
        return session

    def _delay(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(max_backoff, backoff * 2**attempt)]."""
        return self._rng.uniform(0, min(self.max_backoff, self.backoff * (2**attempt)))

    def _send(
        self, label: str, verb: str, url: str, retry_http: frozenset[int], **kwargs: Any
    ) -> requests.Response:
        """One request, retried on transport failures and on ``retry_http`` answers.

        PilotError(COMMUNICATIONFAILURE) when every try failed.
        """
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                delay = self._delay(attempt - 1)
                log.info(
                    "%s: retry %d/%d in %.1f s (%s)", label, attempt, self.retries, delay, last
                )
                self._sleep(delay)
            try:
                # verify/cert per request: requests lets $REQUESTS_CA_BUNDLE override a
                # session's own CA setting, never a request's
                response = self._session().request(
                    verb,
                    url,
                    timeout=self.timeout,
                    verify=self._ca_path or True,
                    cert=self._proxy,
                    **kwargs,
                )
            except requests.exceptions.SSLError as exc:
                raise PilotError(
                    ErrorCode.COMMUNICATIONFAILURE, f"{label}: TLS failure with {self.url}: {exc}"
                ) from None
            except requests.RequestException as exc:
                last = f"{type(exc).__name__}"
                continue
            if response.status_code in retry_http:
                last = f"HTTP {response.status_code}"
                continue
            return response
        raise PilotError(
            ErrorCode.COMMUNICATIONFAILURE,
            f"{label} to {self.url} failed after {self.retries + 1} tries: {last}",
        )

    def post(
        self, method: str, data: dict[str, Any], *, loads: Callable[[bytes], Any] = json.loads
    ) -> ServerReply:
        """One call by its legacy name and fields, over the API in use.

        Returns the server's answer (legacy form) whatever its StatusCode;
        raises PilotError(COMMUNICATIONFAILURE) when no usable answer came back.
        """
        if self._active is Api.V1 and method in ENDPOINTS:
            reply = self._post_v1(method, data, loads)
            if reply is not None:
                return reply
        return self._post_legacy(method, data, loads)

    def _fall_back(self, method: str, text: str) -> None:
        with self._fallback_lock:
            if self._active is Api.LEGACY:
                return
            self._active = Api.LEGACY
        log.warning(
            "%s answers /api/v1 %s with %r: an older PanDA server, using its legacy API"
            " (/server/panda) for the rest of this run",
            self.url,
            ENDPOINTS[method].path,
            text[:80],
        )

    def _post_v1(
        self, method: str, data: dict[str, Any], loads: Callable[[bytes], Any]
    ) -> ServerReply | None:
        """The v1 call of ``method``; None when an auto client has just fallen back."""
        try:
            endpoint, params, dropped = to_v1(method, data)
        except ConversionError as exc:
            raise PilotError(ErrorCode.INTERNALPILOTPROBLEM, f"{method}: {exc}") from None
        if dropped:
            log.debug("%s: not in %s, left out: %s", method, endpoint.path, ", ".join(dropped))
        url = f"{self.url}/api/v1/{endpoint.path}"
        headers = dict(self._headers)
        # the server's body of a 500 from update_event_ranges says nothing that a
        # resend could fix, and the ranges are written already: confirm instead
        retry = _RETRY_HTTP - {500} if method == "updateEventRanges" else _RETRY_HTTP
        if endpoint.verb == "GET":
            response = self._send(method, "GET", url, retry, params=params, headers=headers)
        else:
            headers["Content-Type"] = "application/json"
            body = json.dumps(params).encode("utf-8")
            response = self._send(method, "POST", url, retry, data=body, headers=headers)
        text = response.text
        if is_forbidden(response.status_code, text):
            if self.api is Api.AUTO:
                self._fall_back(method, text.strip())
                return None
            raise PilotError(
                ErrorCode.COMMUNICATIONFAILURE,
                f"{method}: {self.url} does not have {endpoint.path} ({text.strip()[:80]}):"
                " an older PanDA server, use --panda-api legacy or auto",
            )
        if response.status_code != 200:
            # 401/403 here is the token or the proxy (PanDA's StatusCode 50): may pass
            code = 50 if response.status_code in (401, 403) else 30
            return ServerReply(
                response.status_code, {"StatusCode": code, "errorDialog": text[:200]}
            )
        try:
            # the server says text/plain whatever it sends: parse the body, not the header
            envelope = loads(response.content)
        except ValueError:
            raise PilotError(
                ErrorCode.COMMUNICATIONFAILURE,
                f"{method}: {endpoint.path} answer is not JSON: {text[:80]!r}",
            ) from None
        if not is_envelope(envelope):
            raise PilotError(
                ErrorCode.COMMUNICATIONFAILURE,
                f"{method}: {endpoint.path} answer is not a {{success, message, data}} object",
            )
        return ServerReply(200, from_v1(method, envelope), envelope)

    def _post_legacy(
        self, method: str, data: dict[str, Any], loads: Callable[[bytes], Any]
    ) -> ServerReply:
        url = f"{self.url}/server/panda/{method}"
        form = {k: _form_value(v) for k, v in data.items()}
        response = self._send(method, "POST", url, _RETRY_HTTP, data=form, headers=self._headers)
        if is_forbidden(response.status_code, response.text):
            raise PilotError(
                ErrorCode.COMMUNICATIONFAILURE,
                f"{method}: {self.url} no longer has the legacy API ({response.text.strip()[:80]}):"
                " use --panda-api v1 or auto",
            )
        return ServerReply(response.status_code, self._decode(method, response, loads))

    @staticmethod
    def _decode(
        method: str, response: requests.Response, loads: Callable[[bytes], Any] = json.loads
    ) -> dict[str, Any]:
        try:
            body = loads(response.content)
        except ValueError:
            # older PanDA servers answer some calls urlencoded whatever Accept says
            text = response.text.strip()
            pairs = (
                parse_qsl(text, keep_blank_values=True)
                if text.startswith("StatusCode=") or ("&StatusCode=" in text)
                else []
            )
            if not pairs:
                if response.status_code in (401, 403):
                    return {"StatusCode": 70, "errorDialog": text[:200]}
                raise PilotError(
                    ErrorCode.COMMUNICATIONFAILURE,
                    f"{method}: HTTP {response.status_code}, answer is not JSON: {text[:80]!r}",
                ) from None
            body = dict(pairs)
        if not isinstance(body, dict):
            raise PilotError(
                ErrorCode.COMMUNICATIONFAILURE, f"{method}: answer is not a JSON object"
            )
        body["StatusCode"] = _status_code(body)
        return body

    def call(
        self, method: str, data: dict[str, Any], *, loads: Callable[[bytes], Any] = json.loads
    ) -> dict[str, Any]:
        """POST and insist on StatusCode 0; anything else is a PilotError."""
        reply = self.post(method, data, loads=loads)
        if not reply.ok:
            raise PilotError(
                ErrorCode.COMMUNICATIONFAILURE,
                f"{method}: HTTP {reply.http_status}, StatusCode {reply.status_code}: {reply.error}",
            )
        return reply.body

    # -- PanDA methods -------------------------------------------------------------------

    def get_job(self, site_name: str, **params: Any) -> dict[str, Any] | None:
        """A job definition, or None when the server has none (StatusCode 20)."""
        data = {"siteName": site_name, "node": socket.gethostname(), **params}
        reply = self.post("getJob", data)
        if reply.http_status == 200 and reply.status_code == STATUS_NO_JOBS:
            return None
        if not reply.ok:
            raise PilotError(
                ErrorCode.COMMUNICATIONFAILURE,
                f"getJob: HTTP {reply.http_status}, StatusCode {reply.status_code}: {reply.error}",
            )
        job = dict(reply.body)
        job.pop("StatusCode", None)
        return job

    def update_job(self, fields: dict[str, Any]) -> dict[str, Any]:
        """updateJob; the reply's ``command`` is normalised ('NULL' when absent)."""
        if "jobId" not in fields or "state" not in fields:
            raise PilotError(ErrorCode.INTERNALPILOTPROBLEM, "updateJob needs jobId and state")
        body = self.call("updateJob", fields)
        command = body.get("command")
        body["command"] = str(command) if command not in (None, "") else "NULL"
        return body

    def get_event_ranges(
        self, panda_id: int, jobset_id: int, task_id: int, n_ranges: int
    ) -> list[dict[str, Any]]:
        body = self.call(
            "getEventRanges",
            {"pandaID": panda_id, "jobsetID": jobset_id, "taskID": task_id, "nRanges": n_ranges},
            loads=rangejson.loads,
        )
        ranges = body.get("eventRanges", [])
        if isinstance(ranges, str):  # PanDA may send the list as a JSON string
            try:
                ranges = rangejson.loads(ranges) if ranges.strip() else []
            except json.JSONDecodeError:
                raise PilotError(
                    ErrorCode.COMMUNICATIONFAILURE, "getEventRanges: eventRanges is not JSON"
                ) from None
        if not isinstance(ranges, list) or not all(isinstance(r, dict) for r in ranges):
            raise PilotError(ErrorCode.COMMUNICATIONFAILURE, "getEventRanges: bad eventRanges")
        return ranges

    def event_range_statuses(self, pairs: list[tuple[int, int]]) -> dict[str, str]:
        """Status of every range of the ``(jediTaskID, PandaID)`` pairs, by eventRangeID."""
        ids = [{"task_id": t, "panda_id": p} for t, p in sorted(set(pairs))]
        if self._active is Api.V1:
            reply = self.post("get_events_status", {"ids": ids})
            if reply.http_status != 200 or reply.status_code != STATUS_OK:
                raise PilotError(
                    ErrorCode.COMMUNICATIONFAILURE,
                    f"get_event_range_statuses: HTTP {reply.http_status}: {reply.error}",
                )
            by_job = reply.body.get("statuses") or {}
        else:  # the legacy method answers the bare dict, with no StatusCode
            url = f"{self.url}/server/panda/get_events_status"
            response = self._send(
                "get_events_status",
                "POST",
                url,
                _RETRY_HTTP,
                data={"ids": json.dumps(ids)},
                headers=self._headers,
            )
            try:
                by_job = json.loads(response.content) if response.status_code == 200 else None
            except ValueError:
                by_job = None
            if not isinstance(by_job, dict):
                raise PilotError(
                    ErrorCode.COMMUNICATIONFAILURE,
                    f"get_events_status: HTTP {response.status_code}: {response.text[:80]!r}",
                )
        out: dict[str, str] = {}
        for ranges in by_job.values():
            if isinstance(ranges, dict):
                for rid, info in ranges.items():
                    if isinstance(info, dict):
                        out[str(rid)] = str(info.get("status"))
        return out

    def _confirm(self, ranges: list[dict[str, Any]]) -> list[bool]:
        """Per range: does the server hold the final status the pilot sent?

        Non-final updates (``running``) change nothing on the server and
        count as taken. A ``fatal`` range gets a new attempt number on the
        server, so it is matched by its id without the attempt.
        """
        pairs = [k for k in (range_keys(r.get("eventRangeID", "")) for r in ranges) if k]
        statuses = self.event_range_statuses(pairs) if pairs else {}
        by_prefix: dict[str, set[str]] = {}
        for rid, status in statuses.items():
            by_prefix.setdefault(rid.rsplit("-", 1)[0], set()).add(status)
        out = []
        for r in ranges:
            rid, sent = str(r.get("eventRangeID", "")), r.get("eventStatus")
            if sent not in _FINAL_RANGE:
                out.append(True)
                continue
            seen = {statuses[rid]} if rid in statuses else set()
            if sent == "fatal" or not seen:
                seen |= by_prefix.get(rid.rsplit("-", 1)[0], set())
            out.append(bool(seen & _RECORDED[sent]))
        return out

    def update_event_ranges(self, entries: list[dict[str, Any]], version: int = 0) -> list[bool]:
        """One bool per range (v0 entries; v1 groups count their inner ranges).

        Sent in calls of at most 100,000 ranges, PanDA's limit. When the
        answer cannot be trusted (v1's HTTP 500 after the write, the legacy
        extra ``False``), the ranges' statuses on the server decide, and only
        ranges the server does not have are sent again, once.
        """
        out: list[bool] = []
        for start in range(0, len(entries), MAX_RANGES_PER_CALL):
            chunk = entries[start : start + MAX_RANGES_PER_CALL]
            out.extend(self._update_chunk(chunk, version, resend=True))
        return out

    def _update_chunk(
        self, chunk: list[dict[str, Any]], version: int, *, resend: bool
    ) -> list[bool]:
        ranges = flat_ranges(chunk)
        reply = self.post("updateEventRanges", {"eventRanges": chunk, "version": version})
        if reply.http_status == 500 and reply.envelope is None and self._active is Api.V1:
            log.warning(
                "update_event_ranges answered HTTP 500 (%s): asking the status of %d ranges",
                reply.error[:80],
                len(ranges),
            )
            return self._after_doubt(chunk, ranges, version, resend)
        if not reply.ok:
            raise PilotError(
                ErrorCode.COMMUNICATIONFAILURE,
                f"updateEventRanges: HTTP {reply.http_status}, StatusCode {reply.status_code}:"
                f" {reply.error}",
            )
        returns = reply.body.get("Returns")
        if isinstance(returns, str):
            try:
                returns = json.loads(returns)
            except json.JSONDecodeError:
                returns = None
        if not isinstance(returns, list):
            raise PilotError(
                ErrorCode.COMMUNICATIONFAILURE, "updateEventRanges: answer has no Returns list"
            )
        if len(returns) != len(ranges):
            # the server's loop ended in an exception and appended one more False:
            # its answers for the ranges themselves cannot be trusted
            log.warning(
                "updateEventRanges answered %d results for %d ranges: asking their status",
                len(returns),
                len(ranges),
            )
            return self._after_doubt(chunk, ranges, version, resend)
        # None: a non-final status the server skips (nothing to record)
        return [
            r is not False if rng.get("eventStatus") not in _FINAL_RANGE else bool(r)
            for r, rng in zip(returns, ranges)
        ]

    def _after_doubt(
        self, chunk: list[dict[str, Any]], ranges: list[dict[str, Any]], version: int, resend: bool
    ) -> list[bool]:
        taken = self._confirm(ranges)
        if all(taken) or not resend:
            return taken
        missing = {id(r) for r, ok in zip(ranges, taken) if not ok}
        again = _select(chunk, missing)
        log.info("resending %d ranges the server does not have", len(missing))
        self._update_chunk(again, version, resend=False)
        return self._confirm(ranges)


def _select(chunk: list[dict[str, Any]], wanted: set[int]) -> list[dict[str, Any]]:
    """The entries (or v1 groups cut down to the inner ranges) whose ranges are ``wanted``."""
    out = []
    for item in chunk:
        inner = item.get("eventRanges") if isinstance(item, dict) else None
        if isinstance(inner, list):
            keep = [r for r in inner if id(r) in wanted]
            if keep:
                out.append({**item, "eventRanges": keep})
        elif id(item) in wanted:
            out.append(item)
    return out


def pull_jobs(
    client: PandaClient,
    site_name: str,
    *,
    max_jobs: int | None = None,
    **params: Any,
) -> Iterator[tuple[dict[str, Any], float]]:
    """Pull mode: job definitions from getJob until the server has none (or ``max_jobs``).

    Yields ``(definition, seconds the getJob call took)``, the latter for
    ``pilotTiming``. A server that cannot be reached raises PilotError
    (COMMUNICATIONFAILURE) after the client's retries: a pilot with no
    server has nothing to do.
    """
    taken = 0
    while max_jobs is None or taken < max_jobs:
        start = time.monotonic()
        definition = client.get_job(site_name, **params)
        if definition is None:
            log.info("getJob: no more jobs for %s after %d", site_name, taken)
            return
        taken += 1
        yield definition, time.monotonic() - start


class PandaUpstream:
    """The :class:`pilot.comm.base.Upstream` of pull mode: a PanDA server plus a spool.

    Heartbeats are best effort (the next one repeats them); a final update
    that cannot be delivered is spooled and sent later, and earlier spooled
    updates are flushed first so the server sees them in order.
    """

    def __init__(
        self, client: PandaClient, spool: Spool, *, site_name: str = "", node: str = ""
    ) -> None:
        self.client = client
        self.spool = spool
        self.site_name = site_name
        self.node = node or socket.gethostname()
        self.last_command: str | None = None

    def _fields(self, job: Job, fields: dict[str, Any]) -> dict[str, Any]:
        out = {
            "jobId": job.panda_id,
            "siteName": self.site_name,
            "node": self.node,
            "attemptNr": job.attempt_nr,
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        out.update(fields)
        return out

    def flush(self) -> tuple[int, int]:
        """Send what earlier runs spooled (call at start): (sent, left)."""
        return self.spool.flush(self.client)

    def heartbeat(self, job: Job, fields: dict[str, Any]) -> str | None:
        try:
            reply = self.client.update_job(self._fields(job, fields))
        except PilotError as exc:
            log.warning("heartbeat of job %s not delivered: %s", job.panda_id, exc.detail)
            return None
        command = reply.get("command", "NULL")
        self.last_command = None if command == "NULL" else command
        return self.last_command

    def final_update(self, job: Job, fields: dict[str, Any]) -> bool:
        data = self._fields(job, fields)
        if self.spool.pending():
            _, left = self.spool.flush(self.client)
            if left:
                self.spool.put("updateJob", data)
                return False
        try:
            reply = self.client.post("updateJob", data)
        except PilotError as exc:
            log.warning("final update of job %s spooled: %s", job.panda_id, exc.detail)
            self.spool.put("updateJob", data)
            return False
        if reply.ok:
            return True
        if reply.permanent_failure:
            log.error("server refused the final update of job %s: %s", job.panda_id, reply.error)
            self.spool.put("updateJob", data, rejected=True)
            return False
        self.spool.put("updateJob", data)
        return False
