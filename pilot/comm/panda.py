"""PanDA server client (``/server/panda/<method>``) and the PanDA upstream.

Wire conventions are PanDA's: form-encoded POSTs with lists and dicts as JSON
strings, ``Accept: application/json``, a ``StatusCode`` that may come as an
int or a string. Transport failures (refused connection, timeout, HTTP 5xx)
are retried a bounded number of times with exponential backoff and full
jitter, so a thousand pilots that lost the server do not come back in step.

Credentials: an X.509 proxy (client certificate, ``proxy=``) and/or an OIDC
bearer token (``token=``), with a CA directory or bundle (``ca_path=``) for
HTTPS. Neither credential is ever logged: log lines name the method and the
server only.

Retries and idempotency: a retried getJob or updateEventRanges whose first
try did reach the server is answered as a repeat (no job, or ``False`` for a
range already terminal); the server keeps each range's first terminal status,
so a retry never doubles an update, and ``False`` after a retry can mean
"already recorded". Final job updates that cannot be delivered go to the
spool (:mod:`pilot.comm.spool`), which the server deduplicates.
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
from pilot.comm.spool import Spool
from pilot.errors import ErrorCode, PilotError
from pilot.job import Job

log = logging.getLogger(__name__)

STATUS_OK = 0
STATUS_NO_JOBS = 20
MAX_RANGES_PER_CALL = 100_000
_RETRY_HTTP = frozenset({429, 500, 502, 503, 504})


@dataclass(frozen=True)
class ServerReply:
    """One answer of the server: HTTP status and the decoded body (``StatusCode`` an int)."""

    http_status: int
    body: dict[str, Any]

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
    try:
        with open(path, encoding="utf-8") as fh:
            token = fh.read().strip()
    except OSError as exc:
        log.warning("bearer token file named by the environment is unreadable: %s", exc.strerror)
        return None
    return token or None


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
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise PilotError(ErrorCode.COMMUNICATIONFAILURE, f"server URL {url!r} is not http(s)")
        self.url = url.rstrip("/")
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

    @classmethod
    def from_env(cls, url: str, **kwargs: Any) -> PandaClient:
        """A client with the credentials of the environment, as the PanDA pilot takes them:
        bearer token (:func:`token_from_env`), ``$X509_USER_PROXY``, ``$X509_CERT_DIR``."""
        kwargs.setdefault("token", token_from_env())
        proxy = os.environ.get("X509_USER_PROXY")
        kwargs.setdefault("proxy", proxy if proxy and os.path.isfile(proxy) else None)
        ca_path = os.environ.get("X509_CERT_DIR")
        kwargs.setdefault("ca_path", ca_path if ca_path and os.path.exists(ca_path) else None)
        kwargs.setdefault("auth_origin", os.environ.get("OIDC_AUTH_ORIGIN") or None)
        return cls(url, **kwargs)

    def __repr__(self) -> str:
        # Never show the credentials.
        return f"PandaClient({self.url!r})"

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

    def post(
        self, method: str, data: dict[str, Any], *, loads: Callable[[bytes], Any] = json.loads
    ) -> ServerReply:
        """POST one call; retried on transport failures and 5xx.

        Returns the server's answer whatever its StatusCode; raises
        PilotError(COMMUNICATIONFAILURE) when no usable answer came back.
        """
        url = f"{self.url}/server/panda/{method}"
        form = {k: _form_value(v) for k, v in data.items()}
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                delay = self._delay(attempt - 1)
                log.info(
                    "%s: retry %d/%d in %.1f s (%s)", method, attempt, self.retries, delay, last
                )
                self._sleep(delay)
            try:
                # verify/cert per request: requests lets $REQUESTS_CA_BUNDLE override a
                # session's own CA setting, never a request's
                response = self._session().post(
                    url,
                    data=form,
                    headers=self._headers,
                    timeout=self.timeout,
                    verify=self._ca_path or True,
                    cert=self._proxy,
                )
            except requests.exceptions.SSLError as exc:
                raise PilotError(
                    ErrorCode.COMMUNICATIONFAILURE, f"{method}: TLS failure with {self.url}: {exc}"
                ) from None
            except requests.RequestException as exc:
                last = f"{type(exc).__name__}"
                continue
            if response.status_code in _RETRY_HTTP:
                last = f"HTTP {response.status_code}"
                continue
            return ServerReply(response.status_code, self._decode(method, response, loads))
        raise PilotError(
            ErrorCode.COMMUNICATIONFAILURE,
            f"{method} to {self.url} failed after {self.retries + 1} tries: {last}",
        )

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

    def update_event_ranges(self, entries: list[dict[str, Any]], version: int = 0) -> list[bool]:
        """One bool per entry (v0 entries; v1 groups count their inner ranges).

        Sent in calls of at most 100,000 ranges, PanDA's limit.
        """
        out: list[bool] = []
        for start in range(0, len(entries), MAX_RANGES_PER_CALL):
            chunk = entries[start : start + MAX_RANGES_PER_CALL]
            body = self.call("updateEventRanges", {"eventRanges": chunk, "version": version})
            returns = body.get("Returns")
            if isinstance(returns, str):
                try:
                    returns = json.loads(returns)
                except json.JSONDecodeError:
                    returns = None
            if not isinstance(returns, list):
                raise PilotError(
                    ErrorCode.COMMUNICATIONFAILURE, "updateEventRanges: answer has no Returns list"
                )
            out.extend(bool(r) for r in returns)
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
