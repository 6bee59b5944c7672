"""What every copytool shares: the interface, what a transfer moved, cleanup.

Its own module so that the copytools (``copy``, ``http``, ``rucio``) and the
registry that builds them by name (:func:`pilot.data.copytools.make_copytool`)
all import it one way (docs/DESIGN.md, "What each package may import").
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


@dataclass
class TransferResult:
    """What one transfer moved."""

    size: int
    adler32: str
    md5: str = ""
    seconds: float = 0.0
    url: str = ""
    rse: str = ""  # the storage endpoint that served or took the file, when known


class Copytool(Protocol):
    name: str

    def get(
        self, url: str, dest: Path, *, checksum: str = "", timeout: float = 0
    ) -> TransferResult: ...

    def put(self, src: Path, url: str, *, timeout: float = 0) -> TransferResult: ...


def remove_quietly(path: Path) -> None:
    try:
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)
    except OSError:
        pass
