"""Rucio scopes and names from a job, checked before any path is built from them.

Scopes and file names reach storage paths (``<base>/<scope>/<lfn>``) and
Rucio DIDs (``scope:name``). Rucio's generic schema
(``rucio/common/schema/generic.py``) allows a scope of ``[a-zA-Z_\\-.0-9]``,
at most 25 characters, so ``..`` is a valid Rucio scope: a pilot that joins
it into a path writes outside its storage. These checks therefore add the
path rules to Rucio's: no ``.``/``..``, no separators, nothing starting with
a dot-dot. Every copytool and the droids go through :func:`storage_url` /
:func:`did`, and :class:`pilot.job.Job` checks the job's scopes when it is
read, so a bad job fails before it runs (see docs/DESIGN.md, data management).
"""

from __future__ import annotations

import re

from pilot.errors import ErrorCode, PilotError

SCOPE_LENGTH = 25  # Rucio's generic schema
NAME_LENGTH = 250
_SCOPE = re.compile(r"^[a-zA-Z_\-.0-9]+$")
# Rucio's NAME pattern allows "/" (deterministic paths); names here become file names
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.\-_]*$")


def _code(kind: str) -> ErrorCode:
    # an input that cannot be located fails stage-in; an output or log, its name
    return ErrorCode.STAGEINFAILED if kind == "input" else ErrorCode.BADOUTPUTFILENAME


def check_scope(scope: str, key: str = "scope", kind: str = "output") -> str:
    """A Rucio scope that is also safe as one path component; '' (no scope) passes."""
    if scope == "":
        return scope
    if not isinstance(scope, str):
        raise PilotError(_code(kind), f"{key} must be a string, got {type(scope).__name__}")
    if len(scope) > SCOPE_LENGTH:
        raise PilotError(
            _code(kind), f"{key} {scope[:40]!r} is longer than Rucio's {SCOPE_LENGTH} characters"
        )
    if not _SCOPE.match(scope):
        raise PilotError(
            _code(kind), f"{key} {scope!r} is not a Rucio scope (letters, digits, _ - . only)"
        )
    if scope in (".", "..") or scope.startswith(".."):
        raise PilotError(_code(kind), f"{key} {scope!r} would leave the storage directory")
    return scope


def check_name(name: str, key: str = "file name", kind: str = "output") -> str:
    """A Rucio file name that is also a plain file name (no separators, no dot start)."""
    if not isinstance(name, str) or not name:
        raise PilotError(_code(kind), f"empty {key}")
    if len(name) > NAME_LENGTH:
        raise PilotError(
            _code(kind), f"{key} {name[:40]!r}... is longer than Rucio's {NAME_LENGTH} characters"
        )
    if not _NAME.match(name):
        raise PilotError(
            _code(kind),
            f"{key} {name!r} is not a Rucio file name (a letter or digit, then letters, "
            "digits, . - _)",
        )
    return name


def did(scope: str, name: str, kind: str = "input") -> str:
    """``scope:name`` after both are checked; a DID needs a scope."""
    if not scope:
        raise PilotError(_code(kind), f"{name}: no scope, so no Rucio DID")
    return f"{check_scope(scope, 'scope', kind)}:{check_name(name, 'file name', kind)}"


def check_path_part(name: str, key: str = "file name", kind: str = "output") -> str:
    """A name that stays one path component: no separators, not ``.``/``..``, no NUL."""
    if not name or name in (".", "..") or name.startswith(".."):
        raise PilotError(_code(kind), f"{key} {name!r} would leave the storage directory")
    if "/" in name or "\\" in name or "\x00" in name:
        raise PilotError(_code(kind), f"{key} {name!r} is not a plain file name")
    return name


def storage_url(base: str, scope: str, name: str, kind: str = "output") -> str:
    """``<base>/<scope>/<name>`` (``<base>/<name>`` without a scope), both parts checked."""
    check_path_part(name, "file name", kind)
    head = base.rstrip("/")
    if scope:
        return f"{head}/{check_scope(scope, 'scope', kind)}/{name}"
    return f"{head}/{name}"
