"""Checksums the way PanDA and Rucio write them: adler32 as 8 hex digits, md5 as 32."""

from __future__ import annotations

import hashlib
import zlib
from pathlib import Path

from pilot.errors import ErrorCode, PilotError

CHUNK = 1 << 20


class StreamChecksum:
    """adler32 and md5 of a byte stream, fed chunk by chunk while it is copied."""

    def __init__(self, md5: bool = False) -> None:
        self._adler = 1
        self._md5 = hashlib.md5(usedforsecurity=False) if md5 else None
        self.size = 0

    def update(self, chunk: bytes) -> None:
        self._adler = zlib.adler32(chunk, self._adler)
        if self._md5 is not None:
            self._md5.update(chunk)
        self.size += len(chunk)

    @property
    def adler32(self) -> str:
        return f"{self._adler & 0xFFFFFFFF:08x}"

    @property
    def md5(self) -> str:
        return self._md5.hexdigest() if self._md5 is not None else ""


def file_checksum(path: str | Path, kind: str = "adler32") -> str:
    """Checksum of a file; ``kind`` is ``adler32`` or ``md5``."""
    if kind not in ("adler32", "md5"):
        raise PilotError(ErrorCode.UNKNOWNCHECKSUMTYPE, f"checksum type {kind!r}")
    stream = StreamChecksum(md5=kind == "md5")
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(CHUNK):
                stream.update(chunk)
    except OSError as exc:
        raise PilotError(ErrorCode.CHECKSUMCALCFAILURE, f"{path}: {exc}") from None
    return stream.adler32 if kind == "adler32" else stream.md5


def adler32_file(path: str | Path) -> str:
    return file_checksum(path, "adler32")
