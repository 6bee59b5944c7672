"""The ``http`` copytool: streaming GET/PUT against HTTP(S)/WebDAV storage.

A file is streamed in chunks and its adler32 and md5 are computed on the
way, so it is read once and never held in memory. Downloads go to a hidden
``.part`` file renamed into place only when complete and verified, so a
payload never sees half an input.

Errors map to PanDA codes per direction:

===============================  =====================  =====================
what happened                    get                    put
===============================  =====================  =====================
404 / 410                        1331 MISSINGINPUTFILE  1137 STAGEOUTFAILED
401 / 403                        1338 STAGEINAUTH...    1137 STAGEOUTFAILED
507 Insufficient Storage         1099 STAGEINFAILED     1333 NOREMOTESPACE
over the time budget             1151 STAGEINTIMEOUT    1152 STAGEOUTTIMEOUT
adler32 differs                  1171 GETADMISMATCH     1172 PUTADMISMATCH
md5 differs                      1145 GETMD5MISMATCH    1141 PUTMD5MISMATCH
server down, 5xx after retries   1099 STAGEINFAILED     1137 STAGEOUTFAILED
local disk full                  1098 NOLOCALSPACE      --
source file missing              --                     1165 MISSINGOUTPUTFILE
===============================  =====================  =====================

``timeout`` is the budget for the whole transfer including retries: a
stalled server and a trickling one both end at the deadline. Connection
failures and 5xx answers are retried with exponential backoff; a 404 or a
checksum mismatch is not (a retry cannot fix it; the stage-in layer decides).

After a PUT the copytool asks the server for the stored file's checksum
(``HEAD`` with ``Want-Digest: adler32,md5``, RFC 3230, as dCache, EOS and
XRootD's HTTP interface answer) and compares it with what was sent. A server
that answers no digest is trusted with the locally computed one.

Credentials: a bearer token (explicit, or found the WLCG way: ``BEARER_TOKEN``,
``BEARER_TOKEN_FILE``, ``$XDG_RUNTIME_DIR/bt_u<uid>``, ``/tmp/bt_u<uid>``) and
an X.509 proxy (``X509_USER_PROXY``, CA directory ``X509_CERT_DIR``). A token
is only sent over HTTPS, or to a loopback address (local test storage), so a
plain-HTTP URL never carries it across a network. Neither the token nor the
query string of a URL (which may hold a signed credential) appears in logs,
diagnostics or :class:`TransferResult`.
"""

from __future__ import annotations

import base64
import errno
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import requests
import urllib3

from pilot.credentials import find_token, install_log_redaction, redact_url, token_allowed
from pilot.data.checksum import StreamChecksum
from pilot.data.transfer import TransferResult
from pilot.errors import ErrorCode, PilotError
from pilot.job import parse_checksum

log = logging.getLogger(__name__)

CHUNK = 1 << 20
DEFAULT_TIMEOUT = 3600.0
__all__ = ["HttpCopyTool", "HttpCopytool", "TransferResult", "redact_url"]

install_log_redaction()


class _Retry(Exception):
    """A transient failure: worth another attempt while the budget lasts."""


class _Deadline(Exception):
    """The transfer's time budget ran out."""


class _Upload:
    """A file as a request body: checksums while read, stops at the deadline.

    ``__len__`` lets requests send a Content-Length (WebDAV servers prefer
    it to chunked uploads).
    """

    def __init__(self, path: Path, deadline: float, chunk: int) -> None:
        self._fh = open(path, "rb")  # noqa: SIM115 - closed by close()
        self._size = os.fstat(self._fh.fileno()).st_size
        self._deadline = deadline
        self._chunk = chunk
        self.digest = StreamChecksum(md5=True)

    def __len__(self) -> int:
        return self._size

    def read(self, n: int = -1) -> bytes:
        if time.monotonic() > self._deadline:
            raise _Deadline("upload still running at the deadline")
        data = self._fh.read(self._chunk if n is None or n < 0 else min(n, self._chunk))
        self.digest.update(data)
        return data

    def close(self) -> None:
        self._fh.close()


class HttpCopyTool:
    """Streaming HTTP/WebDAV copytool (see the module docstring for codes and credentials)."""

    name = "http"

    def __init__(
        self,
        *,
        token: str | None = None,
        token_file: str | Path | None = None,
        discover_token: bool = True,
        x509_proxy: str | Path | None = None,
        ca_path: str | Path | None = None,
        verify: bool = True,
        proxies: dict[str, str] | None = None,
        retries: int = 2,
        backoff: float = 0.5,
        connect_timeout: float = 30.0,
        chunk_size: int = CHUNK,
        verify_put: bool = True,
        session: requests.Session | None = None,
    ) -> None:
        if token is None and token_file:
            try:
                token = Path(token_file).read_text(encoding="utf-8").strip() or None
            except OSError as exc:
                raise PilotError(
                    ErrorCode.MISSINGCREDENTIALS, f"cannot read token file: {exc.strerror}"
                ) from None
        if token is None and discover_token:
            token = find_token()
        self._token = token
        self.retries = max(0, int(retries))
        self.backoff = max(0.0, float(backoff))
        self.connect_timeout = float(connect_timeout)
        self.chunk_size = max(4096, int(chunk_size))
        self.verify_put = verify_put
        self.session = session or requests.Session()
        if proxies:
            self.session.proxies.update(proxies)
        proxy = x509_proxy or os.environ.get("X509_USER_PROXY")
        self._cert = str(proxy) if proxy and Path(proxy).is_file() else None
        ca = ca_path or os.environ.get("X509_CERT_DIR")
        self._verify: bool | str = str(ca) if verify and ca and Path(ca).exists() else verify

    def __repr__(self) -> str:  # never show the token
        return f"HttpCopyTool(token={'set' if self._token else 'none'}, retries={self.retries})"

    # -- public interface -----------------------------------------------------------
    def get(
        self, url: str, dest: Path, *, checksum: str = "", timeout: float = 0
    ) -> TransferResult:
        """Download ``url`` to ``dest``; verify against ``checksum`` (``ad:``/``md5:``) if given."""
        expected = parse_checksum(checksum) if checksum else None
        dest = Path(dest)
        start = time.monotonic()
        deadline = start + (timeout if timeout and timeout > 0 else DEFAULT_TIMEOUT)
        digest = self._attempts("get", url, deadline, lambda: self._get_once(url, dest, deadline))
        if expected is not None:
            kind, want = expected
            got = digest.adler32 if kind == "adler32" else digest.md5
            if got != want:
                _remove(dest)
                code = ErrorCode.GETADMISMATCH if kind == "adler32" else ErrorCode.GETMD5MISMATCH
                raise PilotError(
                    code, f"{redact_url(url)}: {kind} {got} differs from the expected {want}"
                )
        return TransferResult(
            digest.size,
            digest.adler32,
            digest.md5,
            time.monotonic() - start,
            redact_url(url),
        )

    def put(self, src: Path, url: str, *, timeout: float = 0) -> TransferResult:
        """Upload ``src`` to ``url`` (creating parent collections if needed) and verify it."""
        src = Path(src)
        if not src.is_file():
            raise PilotError(ErrorCode.MISSINGOUTPUTFILE, f"{src} does not exist")
        start = time.monotonic()
        deadline = start + (timeout if timeout and timeout > 0 else DEFAULT_TIMEOUT)
        digest = self._attempts("put", url, deadline, lambda: self._put_once(src, url, deadline))
        if self.verify_put:
            self._verify_remote(url, digest, deadline)
        return TransferResult(
            digest.size,
            digest.adler32,
            digest.md5,
            time.monotonic() - start,
            redact_url(url),
        )

    # -- attempts ---------------------------------------------------------------------
    def _attempts(self, direction: str, url: str, deadline: float, once: Any) -> StreamChecksum:
        get = direction == "get"
        failed = ErrorCode.STAGEINFAILED if get else ErrorCode.STAGEOUTFAILED
        timed_out = ErrorCode.STAGEINTIMEOUT if get else ErrorCode.STAGEOUTTIMEOUT
        shown = redact_url(url)
        last = ""
        for attempt in range(self.retries + 1):
            try:
                return once()
            except _Deadline as exc:
                raise PilotError(timed_out, f"{direction} {shown}: {exc}") from None
            except _Retry as exc:
                last = self._scrub(str(exc), url)
                log.warning("%s %s attempt %d failed: %s", direction, shown, attempt + 1, last)
            pause = self.backoff * (2**attempt)
            if attempt == self.retries or time.monotonic() + pause >= deadline:
                break  # the failure itself was no timeout: report it as what it was
            time.sleep(pause)
        raise PilotError(
            failed, f"{direction} {shown} failed after {self.retries + 1} attempts: {last}"
        )

    def _headers(self, url: str) -> dict[str, str]:
        headers = {"User-Agent": "panda-pilot-http"}
        if self._token and token_allowed(url):
            headers["Authorization"] = f"Bearer {self._token}"
        return headers

    def _timeouts(self, deadline: float) -> tuple[float, float]:
        left = deadline - time.monotonic()
        if left <= 0:
            raise _Deadline("no time left")
        return (min(self.connect_timeout, left), left)

    def _request(self, method: str, url: str, deadline: float, **kw: Any) -> requests.Response:
        """One HTTP request; transport failures become _Retry or _Deadline."""
        try:
            return self.session.request(
                method,
                url,
                headers={**self._headers(url), **kw.pop("headers", {})},
                timeout=self._timeouts(deadline),
                cert=self._cert,
                verify=self._verify,
                allow_redirects=True,
                **kw,
            )
        except requests.exceptions.ReadTimeout:
            raise _Deadline("the server sent nothing until the deadline") from None
        except requests.exceptions.ConnectTimeout:
            if time.monotonic() >= deadline:
                raise _Deadline("connection not established before the deadline") from None
            raise _Retry("connection timed out") from None
        except requests.exceptions.SSLError as exc:
            raise _Retry(f"TLS error: {_reason(exc)}") from None
        except requests.exceptions.ConnectionError as exc:
            raise _Retry(f"cannot reach the server: {_reason(exc)}") from None
        except requests.exceptions.RequestException as exc:
            raise _Retry(f"{type(exc).__name__}: {_reason(exc)}") from None

    def _get_once(self, url: str, dest: Path, deadline: float) -> StreamChecksum:
        resp = self._request("GET", url, deadline, stream=True)
        with resp:
            self._check_status(resp, url, get=True)
            expected = resp.headers.get("Content-Length")
            tmp = dest.with_name(f".{dest.name}.part")
            digest = StreamChecksum(md5=True)
            try:
                with open(tmp, "wb") as out:
                    for chunk in _chunks(resp, self.chunk_size):
                        if time.monotonic() > deadline:
                            raise _Deadline(f"{digest.size} bytes received by the deadline")
                        digest.update(chunk)
                        out.write(chunk)
            except (_Deadline, _Retry):
                _remove(tmp)
                raise
            except (requests.exceptions.ReadTimeout, urllib3.exceptions.ReadTimeoutError):
                _remove(tmp)
                raise _Deadline(f"{digest.size} bytes received by the deadline") from None
            except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError) as exc:
                _remove(tmp)
                raise _Retry(
                    f"download broke off after {digest.size} bytes: {_reason(exc)}"
                ) from None
            except OSError as exc:
                _remove(tmp)
                code = (
                    ErrorCode.NOLOCALSPACE if exc.errno == errno.ENOSPC else ErrorCode.STAGEINFAILED
                )
                raise PilotError(code, f"cannot write {dest.name}: {exc.strerror}") from None
            if expected is not None and expected.isdigit() and int(expected) != digest.size:
                _remove(tmp)
                raise _Retry(f"got {digest.size} bytes of {expected}")
        try:
            os.replace(tmp, dest)
        except OSError as exc:
            _remove(tmp)
            raise PilotError(
                ErrorCode.STAGEINFAILED, f"cannot move {dest.name} into place: {exc.strerror}"
            ) from None
        return digest

    def _put_once(self, src: Path, url: str, deadline: float) -> StreamChecksum:
        for _ in range(2):  # a second time after creating missing parent collections
            try:
                body = _Upload(src, deadline, self.chunk_size)
            except FileNotFoundError:
                raise PilotError(ErrorCode.MISSINGOUTPUTFILE, f"{src} does not exist") from None
            except OSError as exc:
                raise PilotError(
                    ErrorCode.STAGEOUTFAILED, f"cannot read {src.name}: {exc.strerror}"
                ) from None
            try:
                resp = self._request("PUT", url, deadline, data=body)
            finally:
                body.close()
            with resp:
                if resp.status_code == 409:
                    self._mkcol_parents(url, deadline)
                    continue
                self._check_status(resp, url, get=False)
            if body.digest.size != len(body):
                raise _Retry(f"{src.name} changed size while being sent")
            return body.digest
        raise PilotError(
            ErrorCode.STAGEOUTFAILED, f"put {redact_url(url)}: parent collection cannot be created"
        )

    def _mkcol_parents(self, url: str, deadline: float) -> None:
        parts = urlsplit(url)
        segments = [s for s in parts.path.split("/") if s][:-1]
        for i in range(1, len(segments) + 1):
            path = "/" + "/".join(segments[:i]) + "/"
            col = urlunsplit((parts.scheme, parts.netloc, path, "", ""))
            with self._request("MKCOL", col, deadline) as resp:
                # 201 made, 405 already there: both fine
                if resp.status_code >= 500:
                    raise _Retry(f"MKCOL {path}: HTTP {resp.status_code}")

    def _verify_remote(self, url: str, sent: StreamChecksum, deadline: float) -> None:
        try:
            resp = self._request(
                "HEAD", url, deadline, headers={"Want-Digest": "adler32, md5;q=0.5"}
            )
        except (_Retry, _Deadline) as exc:
            log.warning("put %s: cannot verify the stored file: %s", redact_url(url), exc)
            return
        with resp:
            if resp.status_code >= 400:
                log.warning("put %s: HEAD answered %d", redact_url(url), resp.status_code)
                return
            size = resp.headers.get("Content-Length")
            digests = _parse_digest(resp.headers.get("Digest", ""))
        shown = redact_url(url)
        if "adler32" in digests and digests["adler32"] != sent.adler32:
            raise PilotError(
                ErrorCode.PUTADMISMATCH,
                f"{shown}: stored adler32 {digests['adler32']} differs from the sent {sent.adler32}",
            )
        if "md5" in digests and digests["md5"] != sent.md5:
            raise PilotError(
                ErrorCode.PUTMD5MISMATCH,
                f"{shown}: stored md5 {digests['md5']} differs from the sent {sent.md5}",
            )
        if size is not None and size.isdigit() and int(size) != sent.size:
            raise PilotError(
                ErrorCode.STAGEOUTFAILED,
                f"{shown}: stored size {size} differs from the sent {sent.size}",
            )

    @staticmethod
    def _check_status(resp: requests.Response, url: str, *, get: bool) -> None:
        status = resp.status_code
        if status < 300:
            return
        shown = redact_url(url)
        what = f"{'GET' if get else 'PUT'} {shown}: HTTP {status} {resp.reason or ''}".strip()
        if status in (404, 410):
            raise PilotError(ErrorCode.MISSINGINPUTFILE if get else ErrorCode.STAGEOUTFAILED, what)
        if status in (401, 403):
            raise PilotError(
                ErrorCode.STAGEINAUTHENTICATIONFAILURE if get else ErrorCode.STAGEOUTFAILED, what
            )
        if status == 507:
            raise PilotError(ErrorCode.STAGEINFAILED if get else ErrorCode.NOREMOTESPACE, what)
        if status >= 500 or status in (408, 429):
            raise _Retry(what)
        raise PilotError(ErrorCode.STAGEINFAILED if get else ErrorCode.STAGEOUTFAILED, what)

    def _scrub(self, text: str, url: str) -> str:
        """Hide the token and the URL's query in a message that may quote them."""
        if self._token:
            text = text.replace(self._token, "***")
        query = urlsplit(url).query
        if query:
            text = text.replace(query, "***")
        return text


HttpCopytool = HttpCopyTool


def _parse_digest(header: str) -> dict[str, str]:
    """RFC 3230 ``Digest: adler32=0a1b2c3d,md5=<base64>`` -> ``{"adler32": ..., "md5": hex}``."""
    out = {}
    for item in header.split(","):
        name, _, value = item.strip().partition("=")
        name, value = name.strip().lower(), value.strip()
        if not value:
            continue
        if name == "adler32":
            out["adler32"] = value.lower().zfill(8)
        elif name == "md5":
            try:
                out["md5"] = base64.b64decode(value, validate=True).hex()
            except ValueError:
                if len(value) == 32:
                    out["md5"] = value.lower()
    return out


def _chunks(resp: requests.Response, size: int) -> Iterator[bytes]:
    """Body chunks as they arrive (``read1``), so a trickling server meets the deadline check."""
    read1 = getattr(resp.raw, "read1", None)
    if read1 is None:
        yield from resp.iter_content(size)
        return
    for _ in range(1 << 40):  # bounded by the body's size; ends at EOF
        data = read1(size, decode_content=True)
        if not data:
            return
        yield data


def _reason(exc: BaseException) -> str:
    """The innermost cause of a requests error, without the URL it quotes."""
    inner: BaseException = exc
    for _ in range(5):
        nxt = inner.__cause__ or inner.__context__ or (inner.args[0] if inner.args else None)
        if not isinstance(nxt, BaseException):
            break
        inner = nxt
    text = str(getattr(inner, "reason", "") or inner)
    if "Errno" in text:
        text = text[text.find("[Errno") :]
    return text[:200]


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
