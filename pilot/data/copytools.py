"""The copytool interface and the ``copy`` copytool for shared file systems.

A copytool moves one file between a storage URL and a local path and tells
what it moved (size and checksums, computed while copying so a file is read
once). Stage-in/out (``pilot.data.staging``) chooses the copytool from the
queue configuration and turns failures into PanDA codes per direction.

:func:`make_copytool` knows every copytool, so this module imports the
others (``http``, ``rucio``) and none of them imports it: what they share is
in :mod:`pilot.data.transfer` (docs/DESIGN.md, "What each package may import").
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

from pilot.data.checksum import CHUNK, StreamChecksum
from pilot.data.transfer import Copytool, TransferResult, remove_quietly  # noqa: F401 - re-exported
from pilot.errors import ErrorCode, PilotError

DEFAULT_NAME = "copy"


def url_to_path(url: str) -> Path:
    """``file:///a/b`` or a plain path -> a local Path."""
    parsed = urlparse(url)
    if parsed.scheme in ("", "file"):
        return Path(unquote(parsed.path if parsed.scheme else url))
    raise PilotError(
        ErrorCode.NOSTORAGEPROTOCOL, f"the copy tool cannot handle {parsed.scheme}:// URLs"
    )


def _copy_stream(src: Path, dest: Path, md5: bool) -> StreamChecksum:
    stream = StreamChecksum(md5=md5)
    tmp = dest.with_name(f".{dest.name}.part")
    with open(src, "rb") as fin, open(tmp, "wb") as fout:
        while chunk := fin.read(CHUNK):
            stream.update(chunk)
            fout.write(chunk)
    os.replace(tmp, dest)
    return stream


class CopyTool:
    """Shared file system: copy (or symlink, for large read-only inputs) and checksum.

    Symlinking an input avoids a copy on parallel file systems; its checksum
    is still read once, because a corrupt replica must fail stage-in, not
    the payload half-way through.
    """

    name = "copy"

    def __init__(self, symlink_inputs: bool = False) -> None:
        self.symlink_inputs = symlink_inputs

    def get(
        self, url: str, dest: Path, *, checksum: str = "", timeout: float = 0
    ) -> TransferResult:
        src = url_to_path(url)
        start = time.monotonic()
        if not src.is_file():
            raise PilotError(ErrorCode.MISSINGINPUTFILE, f"{src} does not exist")
        want_md5 = checksum.startswith("md5:")
        try:
            if self.symlink_inputs:
                dest.symlink_to(src.resolve())
                stream = StreamChecksum(md5=want_md5)
                with open(src, "rb") as fh:
                    while chunk := fh.read(CHUNK):
                        stream.update(chunk)
            else:
                stream = _copy_stream(src, dest, want_md5)
        except OSError as exc:
            code = ErrorCode.NOLOCALSPACE if exc.errno == 28 else ErrorCode.STAGEINFAILED
            raise PilotError(code, f"copy {src} -> {dest}: {exc}") from None
        return TransferResult(
            stream.size, stream.adler32, stream.md5, time.monotonic() - start, str(src)
        )

    def put(self, src: Path, url: str, *, timeout: float = 0) -> TransferResult:
        dest = url_to_path(url)
        start = time.monotonic()
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            stream = _copy_stream(src, dest, md5=False)
        except FileNotFoundError as exc:
            raise PilotError(ErrorCode.MISSINGOUTPUTFILE, f"{src}: {exc}") from None
        except OSError as exc:
            code = ErrorCode.NOREMOTESPACE if exc.errno == 28 else ErrorCode.STAGEOUTFAILED
            raise PilotError(code, f"copy {src} -> {dest}: {exc}") from None
        return TransferResult(stream.size, stream.adler32, "", time.monotonic() - start, str(dest))


class InPlaceTool:
    """Harvester mode: inputs are linked from the access point, outputs stay where they are.

    Harvester stages files itself (its stage-out reads the pilot's
    ``event_status.dump.json``), so "putting" an output only measures it
    and records its path.
    """

    name = "harvester"

    def get(
        self, url: str, dest: Path, *, checksum: str = "", timeout: float = 0
    ) -> TransferResult:
        return CopyTool(symlink_inputs=True).get(url, dest, checksum=checksum, timeout=timeout)

    def put(self, src: Path, url: str, *, timeout: float = 0) -> TransferResult:
        start = time.monotonic()
        stream = StreamChecksum()
        try:
            with open(src, "rb") as fh:
                while chunk := fh.read(CHUNK):
                    stream.update(chunk)
        except FileNotFoundError:
            raise PilotError(ErrorCode.MISSINGOUTPUTFILE, f"{src} does not exist") from None
        except OSError as exc:
            raise PilotError(ErrorCode.STAGEOUTFAILED, f"{src}: {exc}") from None
        path = str(Path(src).resolve())
        return TransferResult(stream.size, stream.adler32, "", time.monotonic() - start, path)


def make_copytool(name: str, **options: object) -> Copytool:
    """Copytool by its schedconfig name (``copy``, ``http``, ``rucio``)."""
    if name in ("copy", "cp", "mv", "copy_local"):
        return CopyTool(symlink_inputs=bool(options.get("symlink_inputs", False)))
    if name == "harvester":
        return InPlaceTool()
    if name in ("http", "https", "webdav", "gfal"):
        try:
            from pilot.data.http import HttpCopyTool  # noqa: PLC0415 - optional part
        except ImportError:
            raise PilotError(
                ErrorCode.UNKNOWNCOPYTOOL, f"copytool {name!r} is not available"
            ) from None
        return HttpCopyTool(**options)  # type: ignore[arg-type]
    if name == "rucio":
        import importlib.util  # noqa: PLC0415

        if importlib.util.find_spec("rucio") is None:
            raise PilotError(
                ErrorCode.MIDDLEWAREIMPORTFAILURE,
                "copytool 'rucio' needs rucio-clients: pip install 'panda-hpc-pilot[rucio]'",
            )
        from pilot.data.rucio import RucioCopyTool  # noqa: PLC0415 - optional part

        return RucioCopyTool(options.get("rucio"))  # type: ignore[arg-type]
    raise PilotError(ErrorCode.UNKNOWNCOPYTOOL, f"copytool {name!r} is unknown")
