"""Atomic file writes and forgiving reads.

Harvester, the spool, the Yoda journal and the final-update record are all
files that another process may read at any moment. Writers therefore write a
temporary file in the same directory, fsync it and rename it over the target,
so a reader sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from pilot.errors import ErrorCode, PilotError


def atomic_write_bytes(path: str | Path, data: bytes, *, fsync: bool = True) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: str | Path, text: str, *, fsync: bool = True) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


def atomic_write_json(
    path: str | Path, obj: Any, *, fsync: bool = True, indent: int | None = None
) -> None:
    atomic_write_text(
        path, json.dumps(obj, indent=indent, sort_keys=indent is not None), fsync=fsync
    )


def read_json(path: str | Path, *, code: int = ErrorCode.CONVERSIONFAILURE) -> Any:
    """Read a JSON file; a missing, unreadable or truncated file is a PilotError, not a traceback."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PilotError(ErrorCode.NOSUCHFILE, f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PilotError(ErrorCode.FILEHANDLINGFAILURE, f"cannot read {path}: {exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise PilotError(code, f"{path} is not valid JSON ({len(text)} bytes): {exc}") from None


def tail(path: str | Path, max_bytes: int = 4096) -> str:
    """Last ``max_bytes`` of a text file, decoded leniently; '' when absent."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            data = fh.read()
    except OSError:
        return ""
    text = data.decode("utf-8", errors="replace")
    if size > max_bytes:
        nl = text.find("\n")
        if 0 <= nl < len(text) - 1:
            text = text[nl + 1 :]
    return text
