"""Credentials and what must never show them: URL redaction, token discovery, loopback checks.

Tokens, proxies and signed URLs travel with transfers and server calls;
the pilot's logs, traces and log extracts are shipped to places many people
read. Everything that decides where a credential may go, or hides it from
a log line, lives here so there is one place to audit.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


_QUERY_VALUE = re.compile(r"([?&][^=&\s\"]+)=([^&\s\"]*)")


class _RedactQuery(logging.Filter):
    """Hides URL query values in urllib3's debug lines (signed URLs carry credentials there).

    Installed once on urllib3's connection-pool logger, which logs each
    request line at DEBUG; a pilot run with debug logging must not write a
    credential into the log that is shipped with the job.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                _QUERY_VALUE.sub(r"\1=***", a) if isinstance(a, str) else a for a in record.args
            )
        if isinstance(record.msg, str):
            record.msg = _QUERY_VALUE.sub(r"\1=***", record.msg)
        return True


def install_log_redaction() -> None:
    """Hide query values in urllib3's request lines; idempotent."""
    pool_log = logging.getLogger("urllib3.connectionpool")
    if not any(isinstance(f, _RedactQuery) for f in pool_log.filters):
        pool_log.addFilter(_RedactQuery())


def redact_url(url: str) -> str:
    """The URL without user info and with query values hidden (they may be credentials)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable url>"
    netloc = parts.netloc.rsplit("@", 1)[-1]
    query = "&".join(f"{kv.split('=', 1)[0]}=***" for kv in parts.query.split("&") if kv)
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def find_token(environ: dict[str, str] | None = None) -> str | None:
    """A bearer token by WLCG Bearer Token Discovery; ``None`` when there is none."""
    env = os.environ if environ is None else environ
    if env.get("BEARER_TOKEN", "").strip():
        return env["BEARER_TOKEN"].strip()
    candidates = []
    if env.get("BEARER_TOKEN_FILE"):
        candidates.append(Path(env["BEARER_TOKEN_FILE"]))
    uid = os.getuid()
    if env.get("XDG_RUNTIME_DIR"):
        candidates.append(Path(env["XDG_RUNTIME_DIR"]) / f"bt_u{uid}")
    candidates.append(Path(f"/tmp/bt_u{uid}"))
    for path in candidates:
        try:
            text = path.read_text(encoding="utf-8").strip()
        except OSError:
            continue
        if text:
            return text
    return None


def token_allowed(url: str) -> bool:
    """A bearer token goes only over HTTPS or to this machine."""
    parts = urlsplit(url)
    if parts.scheme == "https":
        return True
    return is_loopback(parts.hostname or "")


@dataclass
class TraceAuth:
    """What an authenticated trace carries: headers (a Rucio token), a client certificate.

    Here, not in :mod:`pilot.data.traces`, because the Rucio copytool builds it while
    the trace sender asks the Rucio settings for it: both import this one way."""

    headers: dict[str, str] = field(default_factory=dict)
    cert: str | None = None
    verify: str | bool | None = None
