"""Turn what a payload says it wrote for a range into one checked output file.

A range counts as done only with its output safely in place: the file the
payload names is checked (inside the work directory, present, not empty),
renamed into the output directory, and its size and adler32 are taken
after the rename, so the checksum describes the file that will be shipped.
Several outputs of one range are packed into one uncompressed zip
(``<eventRangeID>.zip``), the unit the event service uploads.
"""

from __future__ import annotations

import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

from pilot.data.checksum import adler32_file as adler32_of
from pilot.errors import ErrorCode, PilotError


@dataclass(frozen=True)
class CollectedOutput:
    path: Path
    fsize: int
    adler32: str


def _inside(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
    except ValueError:
        return False
    return True


def _checked(raw: str, workdir: Path) -> Path:
    path = Path(os.path.realpath(os.path.join(workdir, raw)))
    if not _inside(path, workdir):
        raise PilotError(
            ErrorCode.BADOUTPUTFILENAME, f"output {raw} is outside the work directory {workdir}"
        )
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise PilotError(ErrorCode.MISSINGOUTPUTFILE, f"output {path} does not exist") from None
    except OSError as exc:
        raise PilotError(ErrorCode.FILEHANDLINGFAILURE, f"cannot stat {path}: {exc}") from None
    if not path.is_file():
        raise PilotError(ErrorCode.MISSINGOUTPUTFILE, f"output {path} is not a regular file")
    if size == 0:
        raise PilotError(ErrorCode.EMPTYOUTPUTFILE, f"output {path} is empty")
    return path


def _move(src: Path, dst: Path) -> None:
    try:
        os.replace(src, dst)
    except OSError as exc:
        if exc.errno != 18:  # EXDEV: output directory on another file system
            raise PilotError(
                ErrorCode.FILEHANDLINGFAILURE, f"cannot move {src} to {dst}: {exc}"
            ) from None
        tmp = dst.with_name(f".{dst.name}.part")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
        src.unlink()


def collect_output(
    paths: list[str], event_range_id: str, workdir: Path, output_dir: Path
) -> CollectedOutput:
    """Check, move and checksum a range's outputs; PilotError when they are not usable.

    ``workdir`` and ``output_dir`` are taken as given when absolute (the
    executor resolves them once; resolving per range costs more than the move).
    """
    workdir = Path(workdir) if Path(workdir).is_absolute() else Path(workdir).resolve()
    output_dir = Path(output_dir) if Path(output_dir).is_absolute() else Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    files = [_checked(p, workdir) for p in paths]
    if len(files) == 1:
        src = files[0]
        dst = output_dir / src.name
        if src.parent != output_dir:
            if dst.exists():
                dst = output_dir / f"{event_range_id}.{src.name}"
            _move(src, dst)
    else:
        dst = output_dir / f"{event_range_id}.zip"
        tmp = dst.with_name(f".{dst.name}.part")
        try:
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
                for f in files:
                    zf.write(f, f.name)
            os.replace(tmp, dst)
        except OSError as exc:
            raise PilotError(ErrorCode.FILEHANDLINGFAILURE, f"cannot zip outputs: {exc}") from None
        for f in files:
            f.unlink(missing_ok=True)
    return CollectedOutput(dst, dst.stat().st_size, adler32_of(dst))
