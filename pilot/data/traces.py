"""Rucio-style transfer traces: one per file transfer attempt, sent to a trace URL.

Rucio's trace server (``/traces/``) and the PanDA monitoring built on it read
these field names exactly as the PanDA pilot sends them, so :class:`Trace`
uses them verbatim (hence the camelCase attributes). Times are epoch seconds.

A trace is bookkeeping, never part of the job's outcome: a trace server that
is down, slow or answers garbage is logged as a warning, and the trace is
appended to a JSON-lines spool (``unsent_traces.jsonl``) so the record is
kept; :func:`trace_sender` replays the pilot's spool before each job.

With the rucio copytool the traces go to the Rucio server's ``/traces/``
unless ``--trace-url`` says otherwise, and only the pilot's: the Rucio
clients' own traces are switched off. Rucio's ``/traces/`` takes traces
without authentication; a trace server that is not on this machine gets the
Rucio token (``X-Rucio-Auth-Token``) and, over HTTPS, the X.509 proxy too,
as a site's Rucio behind an authenticating proxy asks.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests

import pilot
from pilot.credentials import TraceAuth, is_loopback, redact_url
from pilot.errors import PilotError, error_diag
from pilot.job import FileSpec, Job

log = logging.getLogger(__name__)

UNSENT_NAME = "unsent_traces.jsonl"
ANALYSIS_LABELS = {"user", "panda"}


class ClientState(str, Enum):
    """``clientState`` values the PanDA pilot reports."""

    INIT_REPORT = "INIT_REPORT"
    FOUND_ROOT = "FOUND_ROOT"
    DONE = "DONE"
    FILE_EXIST = "FILE_EXIST"
    STAGEIN_ATTEMPT_FAILED = "STAGEIN_ATTEMPT_FAILED"
    STAGEOUT_ATTEMPT_FAILED = "STAGEOUT_ATTEMPT_FAILED"
    FAILED_REMOTE_OPEN = "FAILED_REMOTE_OPEN"
    NO_REPLICA = "NO_REPLICA"


def _user_hash() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return hashlib.md5(user.encode(), usedforsecurity=False).hexdigest()


def _ip() -> str:
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return ""


@dataclass
class Trace:
    """One trace; the attribute names are the wire names."""

    eventType: str = "get_sm"  # get_sm, put_sm; get_sm_a, put_sm_a for analysis jobs
    eventVersion: str = field(default_factory=lambda: f"pandapilot {pilot.__version__}")
    clientState: str = ClientState.INIT_REPORT.value
    stateReason: str = ""
    protocol: str = ""
    localSite: str = ""
    remoteSite: str = ""
    timeStart: float = field(default_factory=time.time)
    transferStart: float | None = None
    validateStart: float | None = None
    timeEnd: float | None = None
    dataset: str = ""
    scope: str = ""
    filename: str = ""
    guid: str = ""
    filesize: int = 0
    usr: str = field(default_factory=_user_hash)
    appid: str = ""  # the PandaID
    hostname: str = field(default_factory=socket.gethostname)
    ip: str = field(default_factory=_ip)
    suspicious: str = "0"
    url: str = ""
    uuid: str = field(default_factory=lambda: uuid.uuid4().hex)
    taskid: str = ""
    pq: str = ""

    @classmethod
    def for_file(
        cls,
        job: Job | None,
        spec: FileSpec,
        direction: str,
        *,
        local_site: str = "",
        remote_site: str = "",
        protocol: str = "",
        pq: str = "",
    ) -> Trace:
        """A trace for one file of a job; ``direction`` is ``get`` or ``put``."""
        if direction not in ("get", "put"):
            raise ValueError(f"direction must be get or put, not {direction!r}")
        analysis = job is not None and job.prod_source_label in ANALYSIS_LABELS
        return cls(
            eventType=f"{direction}_sm" + ("_a" if analysis else ""),
            protocol=protocol,
            localSite=local_site,
            remoteSite=remote_site or spec.ddm_endpoint,
            dataset=spec.dataset,
            scope=spec.scope,
            filename=spec.lfn,
            guid=spec.guid,
            filesize=spec.fsize,
            appid=str(job.panda_id) if job else "",
            taskid=str(job.task_id) if job and job.task_id else "",
            pq=pq or local_site,
        )

    @classmethod
    def from_event(
        cls, event: Any, job: Job | None = None, *, local_site: str = "", pq: str = ""
    ) -> Trace:
        """A trace from a stage-in/out transfer event (``pilot.data.staging.TransferEvent``)."""
        trace = cls.for_file(
            job,
            event.spec,
            event.direction,
            local_site=local_site,
            remote_site=getattr(event, "remote_site", ""),
            protocol=event.protocol,
            pq=pq,
        )
        trace.clientState = event.state
        trace.stateReason = event.reason[:256] if event.reason else ""
        trace.timeStart = event.time_start or trace.timeStart
        trace.transferStart = event.transfer_start or None
        trace.validateStart = event.validate_start or None
        trace.timeEnd = event.time_end or None
        trace.filesize = event.size or trace.filesize
        trace.hostname = getattr(event, "hostname", trace.hostname)
        trace.url = _strip_query(event.url)
        return trace

    def done(self, size: int | None = None, url: str = "") -> Trace:
        self.clientState = ClientState.DONE.value
        self.timeEnd = time.time()
        if size is not None:
            self.filesize = size
        if url:
            self.url = _strip_query(url)
        return self

    def failed(self, error: PilotError | str) -> Trace:
        """Mark this attempt failed, with the diagnostic as ``stateReason``."""
        get = self.eventType.startswith("get")
        self.clientState = (
            ClientState.STAGEIN_ATTEMPT_FAILED if get else ClientState.STAGEOUT_ATTEMPT_FAILED
        ).value
        self.stateReason = error.diag if isinstance(error, PilotError) else error_diag(0, error)
        self.timeEnd = time.time()
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class TraceSender:
    """POSTs traces as JSON; failures are logged and kept in ``unsent``, never raised."""

    def __init__(
        self,
        url: str,
        timeout: float = 20.0,
        *,
        unsent: str | Path | None = None,
        session: requests.Session | None = None,
        auth: Callable[[], TraceAuth] | None = None,
        always_auth: bool = False,
    ) -> None:
        self.url = url
        self.timeout = timeout
        self.unsent = Path(unsent) if unsent else None
        self.session = session or requests.Session()
        self.sent = 0
        self.failed = 0
        self._auth = auth
        self._auth_value: TraceAuth | None = None
        self.always_auth = always_auth

    @property
    def needs_auth(self) -> bool:
        """Authenticate where the trace server is not this machine (or when told to)."""
        if self._auth is None or not self.url:
            return False
        return self.always_auth or not is_loopback(urlsplit(self.url).hostname or "")

    def _credentials(self) -> TraceAuth:
        if self._auth_value is None:
            try:
                self._auth_value = self._auth() if self._auth else TraceAuth()
            except PilotError as exc:  # no token: the trace goes without one
                log.warning("traces go without authentication: %s", exc.detail)
                self._auth_value = TraceAuth()
        return self._auth_value

    @classmethod
    def for_workdir(cls, url: str, workdir: str | Path, timeout: float = 20.0) -> TraceSender:
        return cls(url, timeout, unsent=Path(workdir) / UNSENT_NAME)

    def send(self, trace: Trace | dict[str, Any]) -> bool:
        """Send one trace; ``True`` when the server took it."""
        body = trace.to_dict() if isinstance(trace, Trace) else dict(trace)
        if not self.url:
            self._keep(body, "no trace URL configured")
            return False
        headers = {"Content-Type": "application/json"}
        extra: dict[str, Any] = {}
        if self.needs_auth:
            cred = self._credentials()
            headers.update(cred.headers)
            if cred.cert and self.url.startswith("https://"):
                extra["cert"] = cred.cert
            if cred.verify is not None:
                extra["verify"] = cred.verify
        try:
            resp = self.session.post(
                self.url,
                data=json.dumps(body),
                headers=headers,
                timeout=self.timeout,
                **extra,
            )
            ok = 200 <= resp.status_code < 300
            reason = f"HTTP {resp.status_code}"
            resp.close()
        except requests.exceptions.RequestException as exc:
            ok, reason = False, type(exc).__name__
        if ok:
            self.sent += 1
            return True
        self.failed += 1
        log.warning(
            "trace for %s (%s) not sent to %s: %s",
            body.get("filename"),
            body.get("clientState"),
            _strip_query(self.url),
            reason,
        )
        self._keep(body, reason)
        return False

    def _keep(self, body: dict[str, Any], reason: str) -> None:
        if self.unsent is None:
            return
        try:
            self.unsent.parent.mkdir(parents=True, exist_ok=True)
            with open(self.unsent, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(body, sort_keys=True) + "\n")
        except OSError as exc:
            log.warning("cannot keep unsent trace in %s: %s", self.unsent, exc.strerror)

    def resend(self) -> int:
        """Send the traces kept in ``unsent`` again; returns how many went through.

        The first one that fails stops the replay (the server is still away):
        the rest stay, and a down server costs one attempt, not one per trace.
        The spool is taken by renaming it first, so other processes (droids
        share a work directory) may append to a new one meanwhile and two
        replays never send the same trace twice; what is left is appended back."""
        if self.unsent is None or not self.unsent.exists():
            return 0
        keep_path = self.unsent
        taken = keep_path.with_name(f"{keep_path.name}.{os.getpid()}.replay")
        try:
            os.replace(keep_path, taken)
            lines = taken.read_text(encoding="utf-8").splitlines()
        except OSError:
            return 0  # another process took it, or it cannot be read
        self.unsent = None  # do not re-append while replaying
        left, done = [], 0
        try:
            for line in lines:
                try:
                    body = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if left:
                    left.append(line)
                elif isinstance(body, dict) and self.send(body):
                    done += 1
                elif isinstance(body, dict):
                    left.append(line)
        finally:
            self.unsent = keep_path
            try:
                with open(keep_path, "a", encoding="utf-8") as fh:  # the spool stays, maybe empty
                    fh.write("".join(x + "\n" for x in left))
                taken.unlink()
            except OSError as exc:
                log.warning("cannot put unsent traces back in %s: %s", keep_path, exc.strerror)
        return done


class TraceSink:
    """Turns stage-in/out transfer events into traces and sends them (a staging sink)."""

    def __init__(
        self, sender: TraceSender, job: Job | None = None, *, local_site: str = "", pq: str = ""
    ) -> None:
        self.sender = sender
        self.job = job
        self.local_site = local_site
        self.pq = pq

    def __call__(self, event: Any) -> None:
        self.sender.send(Trace.from_event(event, self.job, local_site=self.local_site, pq=self.pq))


SPOOL_DIR = "trace-spool"


def trace_sender(config: Any, timeout: float = 20.0) -> TraceSender:
    """The pilot's trace sender: ``config.trace_url``, else the Rucio server's ``/traces/`` when
    a copytool is rucio; unsent traces spooled under the pilot's work directory and the
    spool replayed now (bounded: it stops at the first trace that does not go)."""
    from pilot.data.choice import uses_rucio  # noqa: PLC0415 - avoids an import cycle

    url = getattr(config, "trace_url", "") or ""
    settings = getattr(config, "rucio", None)
    if settings is None and uses_rucio(config):
        from pilot.data.rucio import RucioSettings  # noqa: PLC0415

        try:
            settings = RucioSettings.from_environ()
        except PilotError as exc:
            log.warning("no Rucio configuration for traces: %s", exc.detail)
    if not url and settings is not None:
        url = settings.trace_url
    sender = TraceSender(
        url,
        timeout,
        unsent=Path(config.workdir) / SPOOL_DIR / UNSENT_NAME,
        auth=settings.trace_auth if settings is not None else None,
    )
    if url:
        sender.resend()
    return sender


def _strip_query(url: str) -> str:
    """A URL for a trace: no query string (it may carry a credential), no user info."""
    return redact_url(url).split("?", 1)[0]


def did_trace_sink(copytool: Any, config: Any, job: Job, local_site: str = "") -> TraceSink | None:
    """The trace sink for files stored through a DID copytool (Rucio) under ``config``;
    None for other copytools, or when no trace server is known."""
    if not getattr(copytool, "by_did", False):
        return None
    sender = trace_sender(config)
    return TraceSink(sender, job, local_site=local_site) if sender.url else None
