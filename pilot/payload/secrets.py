"""The pilot's own credentials, kept from the payload.

A payload is somebody else's code: a user's analysis, or a production
transform with bugs. The pilot's PanDA token and its X.509 proxy let it take
and update jobs, so the payload's environment is built without them
(:func:`scrub`), and inside a container the files behind them are covered
(:func:`secret_paths`, given to the container as paths to hide). Without a
container the payload runs as the same user and could still open a file it
knew the path of; with the variables gone it no longer learns those paths.

A job gets the credentials meant for it, and only on purpose: a proxy for
payloads given with ``--payload-proxy`` is copied into the job's work
directory (mode 0600) and named in ``X509_USER_PROXY``
(:func:`job_credentials`); a user's secrets that PanDA hands with the job
(its ``secrets`` field, from ``prun --useSecrets``) become
``panda_secrets.json`` in the work directory, where the payload looks for
them, mode 0600, never logged, and removed before the log tarball is made
(:func:`job_secrets`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pilot.errors import ErrorCode, PilotError

# Variables through which the pilot finds its own credentials: PanDA's token
# variables, WLCG bearer-token discovery, and the X.509 proxy, certificate and key.
CREDENTIAL_VARIABLES = (
    "OIDC_AUTH_TOKEN",
    "OIDC_AUTH_ORIGIN",
    "OIDC_AUTH_DIR",
    "OIDC_REFRESHED_TOKEN",
    "PANDA_AUTH_TOKEN",
    "PANDA_AUTH_ORIGIN",
    "PANDA_AUTH_DIR",
    "PANDA_AUTH_ID_TOKEN",
    "PANDA_AUTH_TOKEN_KEY",
    "BEARER_TOKEN",
    "BEARER_TOKEN_FILE",
    "X509_USER_PROXY",
    "X509_USER_CERT",
    "X509_USER_KEY",
)
PAYLOAD_PROXY_NAME = ".payload_x509_proxy"
SECRETS_FILE = "panda_secrets.json"


def scrub(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` without the pilot's credential variables."""
    return {k: v for k, v in env.items() if k not in CREDENTIAL_VARIABLES}


def secret_paths(env: Mapping[str, str]) -> list[str]:
    """Files and directories holding the pilot's credentials, as ``env`` names or implies them."""
    uid = os.getuid()
    found: list[str] = []
    for key in ("X509_USER_PROXY", "X509_USER_CERT", "X509_USER_KEY", "BEARER_TOKEN_FILE"):
        if env.get(key):
            found.append(env[key])
    for token, directory in (
        ("OIDC_AUTH_TOKEN", "OIDC_AUTH_DIR"),
        ("PANDA_AUTH_TOKEN", "PANDA_AUTH_DIR"),
    ):
        base = env.get(directory, "")
        if env.get(token):
            found.append(str(Path(base) / env[token]) if base else env[token])
        if base:
            found.append(base)
    found.append(f"/tmp/x509up_u{uid}")
    found.append(f"/tmp/bt_u{uid}")
    if env.get("XDG_RUNTIME_DIR"):
        found.append(str(Path(env["XDG_RUNTIME_DIR"]) / f"bt_u{uid}"))
    out = []
    for path in found:
        resolved = str(Path(path).resolve())
        if resolved not in out and resolved != "/":
            out.append(resolved)
    return out


def job_credentials(workdir: Path, payload_proxy: str | None) -> dict[str, str]:
    """Variables for the credentials meant for the job, their files put in ``workdir``."""
    if not payload_proxy:
        return {}
    target = Path(workdir) / PAYLOAD_PROXY_NAME
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out, open(payload_proxy, "rb") as src:
            shutil.copyfileobj(src, out)
    except OSError as exc:
        raise PilotError(ErrorCode.NOPROXY, f"payload proxy {payload_proxy}: {exc}") from None
    return {"X509_USER_PROXY": str(target)}


@contextlib.contextmanager
def job_secrets(workdir: Path, raw: Mapping[str, Any]) -> Iterator[Path | None]:
    """``panda_secrets.json`` for the payload while it runs, when the job carries secrets."""
    value = raw.get("secrets")
    if value in (None, "", "NULL", "None", {}, []):
        yield None
        return
    text = value if isinstance(value, str) else json.dumps(value)
    path = Path(workdir) / SECRETS_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
    except OSError as exc:
        raise PilotError(
            ErrorCode.FILEHANDLINGFAILURE, f"cannot write {path.name}: {exc}"
        ) from None
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
