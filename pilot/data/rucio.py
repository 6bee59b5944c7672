"""The ``rucio`` copytool: stage-in by DID and stage-out with registration, on Rucio's client API.

Inputs are downloaded by DID (``scopeIn:inFiles``) into the work directory,
from the job's ``ddmEndPointIn`` RSE where it names one; Rucio checks the
file against its catalogue checksum and stage-in then checks it against the
job's. Outputs and the log go to the job's ``ddmEndPointOut`` with the job's
GUID, are registered, and are attached to the job's dataset
(``destinationDblock``), which is created when it does not exist yet.

The client's own traces are switched off (``tracing=False``) and collected
with ``traces_copy_out``: the pilot sends one trace per transfer itself
(:mod:`pilot.data.traces`), with the PanDA fields, so Rucio gets each
transfer once.

Failures map to PanDA codes (see docs/DESIGN.md, data management):

==========================================  ============================  ========================
what happened                               get                           put
==========================================  ============================  ========================
DID unknown                                 1331 MISSINGINPUTFILE         --
no replica on the allowed RSEs              1326 NOREPLICAS               --
replica corrupt (checksum differs)          1171 GETADMISMATCH            1172 PUTADMISMATCH
RSE unknown                                 1133 NOSTORAGE                1133 NOSTORAGE
RSE unavailable / blocked for writes        1324 SERVICENOTAVAILABLE      1324 SERVICENOTAVAILABLE
DID exists with another checksum            --                            1221 FILEEXISTS
authentication refused                      1338 STAGEINAUTHENTICATION..  1163 NOPROXY
over the time budget                        1151 STAGEINTIMEOUT           1152 STAGEOUTTIMEOUT
server down (after retries with backoff)    1316 RUCIOSERVICEUNAVAILABLE  1316 RUCIOSERVICEUNAVAILABLE
no client library / no client config        1342 MIDDLEWAREIMPORTFAILURE  1342
anything else Rucio refuses                 1099 STAGEINFAILED            1137 STAGEOUTFAILED
==========================================  ============================  ========================

Account and credentials come from the usual Rucio client configuration,
read once into :class:`RucioSettings`: ``RUCIO_CONFIG`` (else
``$RUCIO_HOME/etc/rucio.cfg``, else ``/opt/rucio/etc/rucio.cfg``), with
``RUCIO_ACCOUNT`` and ``RUCIO_AUTH_TYPE`` overriding the file, an X.509
proxy from ``X509_USER_PROXY``, and for ``oidc`` a bearer token that the client
finds by WLCG token discovery (``BEARER_TOKEN``, ``BEARER_TOKEN_FILE`` ...).
"""

from __future__ import annotations

import configparser
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pilot.credentials import TraceAuth
from pilot.data.checksum import CHUNK, StreamChecksum
from pilot.data.names import check_name, did
from pilot.data.transfer import TransferResult, remove_quietly
from pilot.errors import ErrorCode, PilotError
from pilot.job import FileSpec

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 3600.0
# while the server is away: tries after the first, and the first pause (doubling)
RETRIES = 2
BACKOFF = 1.0
# REST calls get at most this long each, inside the transfer's budget
REQUEST_TIMEOUT = 120.0


def find_config(environ: Mapping[str, str]) -> Path | None:
    """Where the Rucio client library will read its configuration, as it looks for it."""
    if environ.get("RUCIO_CONFIG"):
        return Path(environ["RUCIO_CONFIG"])
    for d in ([f"{environ['RUCIO_HOME']}/etc"] if environ.get("RUCIO_HOME") else []) + [
        "/opt/rucio/etc"
    ]:
        p = Path(d) / "rucio.cfg"
        if p.is_file():
            return p
    return None


@dataclass(frozen=True)
class RucioSettings:
    """The Rucio client configuration as the pilot uses it, read once at start."""

    config_path: str
    host: str
    auth_host: str
    account: str
    auth_type: str = "userpass"
    username: str = ""
    password: str = ""
    client_cert: str = ""
    client_key: str = ""
    x509_proxy: str = ""
    ca_cert: str = ""
    vo: str = ""

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> RucioSettings:
        env = os.environ if environ is None else environ
        path = find_config(env)
        if path is None or not path.is_file():
            raise PilotError(
                ErrorCode.MIDDLEWAREIMPORTFAILURE,
                "no Rucio client configuration: set RUCIO_CONFIG (or RUCIO_HOME) "
                + (f"({path} does not exist)" if path else ""),
            )
        parser = configparser.ConfigParser(interpolation=None)
        try:
            parser.read(path, encoding="utf-8")
        except (configparser.Error, OSError, UnicodeDecodeError) as exc:
            raise PilotError(
                ErrorCode.MIDDLEWAREIMPORTFAILURE, f"Rucio configuration {path}: {exc}"
            ) from None
        client = parser["client"] if parser.has_section("client") else {}
        host = client.get("rucio_host", "")
        if not host:
            raise PilotError(
                ErrorCode.MIDDLEWAREIMPORTFAILURE, f"Rucio configuration {path} has no rucio_host"
            )
        # oidc: the client finds the bearer token itself, by WLCG token discovery
        # (BEARER_TOKEN, BEARER_TOKEN_FILE, $XDG_RUNTIME_DIR/bt_u<uid>, /tmp/bt_u<uid>)
        auth_type = env.get("RUCIO_AUTH_TYPE") or client.get("auth_type", "userpass")
        return cls(
            config_path=str(path),
            host=host.rstrip("/"),
            auth_host=client.get("auth_host", host).rstrip("/"),
            account=env.get("RUCIO_ACCOUNT") or client.get("account", ""),
            auth_type=auth_type,
            username=client.get("username", ""),
            password=client.get("password", ""),
            client_cert=env.get("RUCIO_CLIENT_CERT") or client.get("client_cert", ""),
            client_key=env.get("RUCIO_CLIENT_KEY") or client.get("client_key", ""),
            x509_proxy=env.get("X509_USER_PROXY") or client.get("client_x509_proxy", ""),
            ca_cert=env.get("X509_CERT_DIR") or client.get("ca_cert", ""),
            vo=env.get("RUCIO_VO") or client.get("vo", ""),
        )

    @property
    def trace_url(self) -> str:
        return f"{self.host}/traces/"

    def trace_auth(self) -> TraceAuth:
        """Credentials for a trace server that is not local: this account's Rucio token,
        the X.509 proxy as client certificate, the CA path."""
        client = self.client(30.0, "put")
        headers = {"X-Rucio-Auth-Token": client.auth_token}
        if client.account:
            headers["X-Rucio-Account"] = client.account
        return TraceAuth(headers, self.x509_proxy or None, self.ca_cert or None)

    def creds(self) -> dict[str, Any]:
        if self.auth_type == "userpass":
            return {"username": self.username, "password": self.password}
        if self.auth_type == "x509":
            return {"client_cert": self.client_cert, "client_key": self.client_key or None}
        if self.auth_type == "x509_proxy":
            return {"client_proxy": self.x509_proxy or None}
        return {}

    def client(self, timeout: float = REQUEST_TIMEOUT, direction: str = "get") -> Any:
        """A Rucio ``Client`` for these settings (it authenticates now)."""
        try:
            from rucio.client import Client  # noqa: PLC0415 - optional dependency
        except ImportError as exc:
            raise PilotError(
                ErrorCode.MIDDLEWAREIMPORTFAILURE,
                f"the rucio copytool needs rucio-clients (pip install 'panda-hpc-pilot[rucio]'): {exc}",
            ) from None
        if os.environ.get("RUCIO_CONFIG") != self.config_path:
            # the library reads its other settings (and its RSE client's) from here
            os.environ["RUCIO_CONFIG"] = self.config_path
            from rucio.common.config import clean_cached_config  # noqa: PLC0415

            clean_cached_config()
        try:
            client = Client(
                rucio_host=self.host,
                auth_host=self.auth_host,
                account=self.account or None,
                auth_type=self.auth_type,
                creds=self.creds() or None,
                ca_cert=self.ca_cert or None,
                vo=self.vo or None,
                timeout=max(1, int(timeout)),
                user_agent="panda-pilot",
                # its messages go to the pilot's log, not to a coloured handler of its own
                logger=logging.getLogger("pilot.data.rucio.client"),
            )
        except Exception as exc:  # noqa: BLE001 - every client failure gets a code
            raise map_error(exc, direction, f"Rucio at {self.host}") from None
        return client


class _Log:
    """What Rucio's clients take as a logger: callable as ``logger(level, msg)`` with ``.log``."""

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger

    def __call__(self, level: int, msg: str, *args: Any, **kwargs: Any) -> None:
        # one level down: the pilot reports a failed transfer itself, with its code
        kwargs.pop("exc_info", None)
        self._logger.log(
            min(level, logging.INFO) if level < logging.ERROR else logging.WARNING, msg, *args
        )

    log = __call__


def _rucio_exceptions() -> Any:
    from rucio.common import exception  # noqa: PLC0415

    return exception


def map_error(exc: BaseException, direction: str, context: str = "") -> PilotError:
    """A Rucio client (or requests) exception as the PilotError of the table above."""
    if isinstance(exc, PilotError):
        return exc
    get = direction == "get"
    detail = f"{context}: " if context else ""
    detail += f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    import requests  # noqa: PLC0415

    if isinstance(exc, requests.exceptions.Timeout):
        return PilotError(ErrorCode.STAGEINTIMEOUT if get else ErrorCode.STAGEOUTTIMEOUT, detail)
    if isinstance(exc, requests.exceptions.RequestException):
        return PilotError(ErrorCode.RUCIOSERVICEUNAVAILABLE, detail)
    try:
        e = _rucio_exceptions()
    except ImportError:
        return PilotError(ErrorCode.STAGEINFAILED if get else ErrorCode.STAGEOUTFAILED, detail)
    auth = (e.CannotAuthenticate, e.MissingClientParameter, e.AccessDenied, e.RSEAccessDenied)
    table: list[tuple[Any, ErrorCode]] = [
        (auth, ErrorCode.STAGEINAUTHENTICATIONFAILURE if get else ErrorCode.NOPROXY),
        ((e.RSEWriteBlocked,), ErrorCode.SERVICENOTAVAILABLE),
        ((e.RSENotFound, e.InvalidRSEExpression), ErrorCode.NOSTORAGE),
        ((e.DataIdentifierAlreadyExists, e.FileReplicaAlreadyExists), ErrorCode.FILEEXISTS),
        ((e.DataIdentifierNotFound,), ErrorCode.MISSINGINPUTFILE),
        ((e.ReplicaNotFound,), ErrorCode.NOREPLICAS),
        (
            (e.ServiceUnavailable, e.ServerConnectionException, e.ResourceTemporaryUnavailable),
            ErrorCode.RUCIOSERVICEUNAVAILABLE,
        ),
    ]
    for classes, code in table:
        if isinstance(exc, classes):
            if code == ErrorCode.MISSINGINPUTFILE and not get:
                code = ErrorCode.STAGEOUTFAILED
            return PilotError(code, detail)
    if "timed out" in str(exc).lower() or "timeout" in type(exc).__name__.lower():
        return PilotError(ErrorCode.STAGEINTIMEOUT if get else ErrorCode.STAGEOUTTIMEOUT, detail)
    return PilotError(ErrorCode.STAGEINFAILED if get else ErrorCode.STAGEOUTFAILED, detail)


def _state(value: Any) -> str:
    """A FileDownloadState (an enum in recent clients, a string in older ones) as its name."""
    return str(getattr(value, "value", value) or "")


def _pfn_of(item: Mapping[str, Any], rse: str) -> str:
    """The PFN a download used: its source on ``rse`` (the download client tried them in order)."""
    sources = item.get("sources") or []
    for source in sources:
        if isinstance(source, dict) and source.get("rse") == rse and source.get("pfn"):
            return str(source["pfn"])
    return ""


def _measure(path: Path) -> StreamChecksum:
    stream = StreamChecksum(md5=True)
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            stream.update(chunk)
    return stream


class RucioCopyTool:
    """Stage-in by DID, stage-out with registration (module docstring: codes, credentials).

    ``by_did`` tells stage-in/out to hand over the FileSpec (scope, RSE,
    dataset, GUID) rather than a storage URL. One client (one token) serves
    every file of the copytool's life.
    """

    name = "rucio"
    by_did = True

    def __init__(
        self,
        settings: RucioSettings | None = None,
        *,
        client: Any = None,
        retries: int = RETRIES,
        backoff: float = BACKOFF,
    ) -> None:
        self.settings = settings
        self._client = client
        self.retries = retries
        self.backoff = backoff
        self.last_trace: dict[str, Any] = {}

    def _retrying(self, once: Any, timeout: float, what: str) -> TransferResult:
        """``once(budget)`` again while the server is away (1316), with exponential
        backoff, inside the transfer's time budget: a Rucio server restarting for a
        minute should not fail the job. Every other failure is final here (stage-in/out
        decide about other attempts)."""
        deadline = time.monotonic() + (timeout if timeout and timeout > 0 else DEFAULT_TIMEOUT)
        delay = self.backoff
        for attempt in range(self.retries + 1):
            try:
                return once(max(1.0, deadline - time.monotonic()))
            except PilotError as exc:
                last = attempt == self.retries or time.monotonic() + delay >= deadline
                if exc.code != ErrorCode.RUCIOSERVICEUNAVAILABLE or last:
                    raise
                log.warning("%s: %s; again in %.1f s", what, exc.detail, delay)
                time.sleep(delay)
                delay *= 2
                self._client = None  # a new connection, and a new token if it must
        raise AssertionError("unreachable")  # the loop returns or raises

    @property
    def client(self) -> Any:
        return self._connect("get")

    def _connect(self, direction: str, timeout: float = REQUEST_TIMEOUT) -> Any:
        if self._client is None:
            settings = self.settings or RucioSettings.from_environ()
            self.settings = settings
            self._client = settings.client(timeout, direction)
        return self._client

    def _budget(self, timeout: float, direction: str) -> float:
        budget = timeout if timeout and timeout > 0 else DEFAULT_TIMEOUT
        request = max(1, int(min(budget, REQUEST_TIMEOUT)))
        self._connect(direction, request).timeout = request
        return budget

    # -- stage-in ----------------------------------------------------------------------

    def get_did(self, spec: FileSpec, dest: Path, *, timeout: float = 0) -> TransferResult:
        """Download ``spec`` (its DID) to ``dest``, from ``spec.ddm_endpoint`` when set."""
        return self._retrying(
            lambda budget: self._get_once(spec, dest, budget), timeout, f"download of {spec.lfn}"
        )

    def _get_once(self, spec: FileSpec, dest: Path, timeout: float) -> TransferResult:
        name = did(spec.scope, spec.lfn, "input")
        start = time.monotonic()
        try:
            from rucio.client.downloadclient import DownloadClient  # noqa: PLC0415
        except ImportError as exc:
            raise PilotError(ErrorCode.MIDDLEWAREIMPORTFAILURE, f"rucio-clients: {exc}") from None
        budget = self._budget(timeout, "get")
        rse = spec.ddm_endpoint.strip()
        if rse:
            self._check_rse(rse, "read", "get")
        # an existing file would be taken as ALREADY_DONE, and that path sends its own trace
        remove_quietly(dest)
        item: dict[str, Any] = {
            "did": name,
            "base_dir": str(dest.parent),
            "no_subdir": True,
            "transfer_timeout": max(1, int(budget)),
        }
        if rse:
            item["rse"] = rse
        traces: list[dict[str, Any]] = []
        try:
            client = DownloadClient(client=self.client, logger=_Log(log), tracing=False)
            out = client.download_dids(
                [item],
                num_threads=1,
                traces_copy_out=traces,
                deactivate_file_download_exceptions=True,
            )
        except Exception as exc:  # noqa: BLE001
            raise map_error(exc, "get", name) from None
        trace = traces[-1] if traces else {}
        self.last_trace = trace
        got = out[0] if out else {}
        state = _state(got.get("clientState"))
        seconds = time.monotonic() - start
        if state in ("DONE", "ALREADY_DONE"):
            produced = Path((got.get("dest_file_paths") or [str(dest)])[0])
            if produced != dest:
                os.replace(produced, dest)
            return TransferResult(
                int(got.get("bytes") or dest.stat().st_size),
                str(got.get("adler32") or ""),
                str(got.get("md5") or ""),
                seconds,
                url=_pfn_of(got, str(trace.get("remoteSite") or rse)) or name,
                rse=str(trace.get("remoteSite") or rse),
            )
        remove_quietly(dest)
        reason = str(trace.get("stateReason") or state or "download failed")
        trace_state = _state(trace.get("clientState"))
        if state == "FILE_NOT_FOUND":
            if got.get("adler32") is None and got.get("bytes") is None:
                raise PilotError(ErrorCode.MISSINGINPUTFILE, f"{name} is not known to Rucio")
            where = f"on {rse}" if rse else "on any RSE"
            raise PilotError(ErrorCode.NOREPLICAS, f"{name} has no available replica {where}")
        if trace_state == "FAIL_VALIDATE":
            raise PilotError(ErrorCode.GETADMISMATCH, f"{name}: {reason}")
        if seconds >= budget or "timed out" in reason.lower() or "timeout" in reason.lower():
            raise PilotError(ErrorCode.STAGEINTIMEOUT, f"{name}: {reason}")
        raise PilotError(ErrorCode.STAGEINFAILED, f"{name}: {reason}")

    def get(
        self, url: str, dest: Path, *, checksum: str = "", timeout: float = 0
    ) -> TransferResult:
        """``url`` is a DID, ``scope:name``: the Copytool interface for callers without a FileSpec."""
        scope, sep, name = url.partition(":")
        if not sep:
            raise PilotError(ErrorCode.STAGEINFAILED, f"{url!r} is not a Rucio DID (scope:name)")
        spec = FileSpec(name, "input", scope=scope, checksum=checksum)
        return self.get_did(spec, dest, timeout=timeout)

    # -- stage-out ---------------------------------------------------------------------

    def put_did(self, spec: FileSpec, src: Path, *, timeout: float = 0) -> TransferResult:
        """Upload ``src`` as ``spec`` to ``spec.ddm_endpoint``, registered, attached to its dataset."""
        return self._retrying(
            lambda budget: self._put_once(spec, src, budget), timeout, f"upload of {spec.lfn}"
        )

    def _put_once(self, spec: FileSpec, src: Path, timeout: float) -> TransferResult:
        name = did(spec.scope, spec.lfn, spec.kind)
        start = time.monotonic()
        rse = spec.ddm_endpoint.strip()
        if not rse:
            raise PilotError(ErrorCode.NOSTORAGE, f"{name}: the job names no ddmEndPointOut")
        try:
            from rucio.client.uploadclient import UploadClient  # noqa: PLC0415
        except ImportError as exc:
            raise PilotError(ErrorCode.MIDDLEWAREIMPORTFAILURE, f"rucio-clients: {exc}") from None
        dataset = spec.destination_dblock or spec.dataset
        if dataset:
            check_name(dataset, "destinationDblock", spec.kind)
        try:
            local = _measure(src)
        except FileNotFoundError:
            raise PilotError(ErrorCode.MISSINGOUTPUTFILE, f"{src} does not exist") from None
        except OSError as exc:
            raise PilotError(ErrorCode.STAGEOUTFAILED, f"{src}: {exc}") from None
        budget = self._budget(timeout, "put")
        self._check_rse(rse, "write", "put")
        done = self._already_there(spec, rse, local, dataset)
        if done is None:
            item: dict[str, Any] = {
                "path": str(src),
                "rse": rse,
                "did_scope": spec.scope,
                "did_name": spec.lfn,
                "register_after_upload": True,
                "transfer_timeout": max(1, int(budget)),
            }
            if spec.guid:
                item["guid"] = spec.guid
            if dataset:
                item.update(dataset_scope=spec.scope, dataset_name=dataset)
            traces: list[dict[str, Any]] = []
            try:
                UploadClient(_client=self.client, logger=_Log(log), tracing=False).upload(
                    [item], traces_copy_out=traces
                )
            except Exception as exc:  # noqa: BLE001
                reason = str((traces[-1] if traces else {}).get("stateReason") or "")
                error = map_error(exc, "put", name + (f" ({reason})" if reason else ""))
                if time.monotonic() - start >= budget:
                    error = PilotError(ErrorCode.STAGEOUTTIMEOUT, error.detail)
                raise error from None
            self.last_trace = traces[-1] if traces else {}
            done = self._registered(spec, rse, local)
        return TransferResult(
            local.size, local.adler32, local.md5, time.monotonic() - start, url=done, rse=rse
        )

    def put(self, src: Path, url: str, *, timeout: float = 0) -> TransferResult:
        raise PilotError(
            ErrorCode.NOTIMPLEMENTED,
            "the rucio copytool uploads FileSpecs (scope, RSE, dataset), not URLs",
        )

    # -- helpers -----------------------------------------------------------------------

    def _check_rse(self, rse: str, operation: str, direction: str) -> None:
        """Ask the server (not a cache) whether ``rse`` takes ``operation`` now."""
        try:
            info = self.client.get_rse(rse)
        except Exception as exc:  # noqa: BLE001
            raise map_error(exc, direction, f"RSE {rse}") from None
        if not info.get(f"availability_{operation}", True):
            raise PilotError(
                ErrorCode.SERVICENOTAVAILABLE, f"RSE {rse} is not available for {operation}ing"
            )

    def _already_there(
        self, spec: FileSpec, rse: str, local: StreamChecksum, dataset: str
    ) -> str | None:
        """The PFN when this very file is already registered on ``rse`` (a retry after a
        lost answer); FILEEXISTS when the DID exists with other content; None to upload."""
        e = _rucio_exceptions()
        try:
            meta = self.client.get_metadata(spec.scope, spec.lfn)
        except e.DataIdentifierNotFound:
            return None
        except Exception as exc:  # noqa: BLE001
            raise map_error(exc, "put", f"{spec.scope}:{spec.lfn}") from None
        theirs = str(meta.get("adler32") or "").lstrip("0")
        if theirs != local.adler32.lstrip("0") or int(meta.get("bytes") or -1) != local.size:
            raise PilotError(
                ErrorCode.FILEEXISTS,
                f"{spec.scope}:{spec.lfn} exists in Rucio with adler32 {meta.get('adler32')} "
                f"and {meta.get('bytes')} bytes, this file has {local.adler32}, {local.size}",
            )
        pfn = self._pfn(spec, rse)
        if pfn is None:
            return None
        if dataset:
            try:
                self.client.attach_dids(
                    spec.scope, dataset, [{"scope": spec.scope, "name": spec.lfn}]
                )
            except e.FileAlreadyExists:
                pass
            except e.DataIdentifierNotFound:
                return None  # no dataset yet: the upload creates it
            except Exception as exc:  # noqa: BLE001
                raise map_error(exc, "put", f"attach to {dataset}") from None
        return pfn

    def _replica(self, spec: FileSpec, rse: str) -> tuple[str | None, str]:
        """The PFN on ``rse`` (None when there is none) and the catalogue's adler32."""
        try:
            reps = list(self.client.list_replicas([{"scope": spec.scope, "name": spec.lfn}]))
        except Exception as exc:  # noqa: BLE001
            raise map_error(exc, "put", f"{spec.scope}:{spec.lfn}") from None
        if not reps:
            return None, ""
        pfns = (reps[0].get("rses") or {}).get(rse)
        return (pfns[0] if pfns else None), str(reps[0].get("adler32") or "")

    def _pfn(self, spec: FileSpec, rse: str) -> str | None:
        return self._replica(spec, rse)[0]

    def _registered(self, spec: FileSpec, rse: str, local: StreamChecksum) -> str:
        """After the upload: the catalogue must have this file, on ``rse``, with our checksum
        (one replica lookup answers both)."""
        pfn, theirs = self._replica(spec, rse)
        if theirs.lstrip("0") != local.adler32.lstrip("0"):
            raise PilotError(
                ErrorCode.PUTADMISMATCH,
                f"{spec.scope}:{spec.lfn}: Rucio has adler32 {theirs or None}, "
                f"the file {local.adler32}",
            )
        if pfn is None:
            raise PilotError(
                ErrorCode.STAGEOUTFAILED,
                f"{spec.scope}:{spec.lfn} uploaded but no replica on {rse}",
            )
        return pfn
