"""Stage-in and stage-out of a job's files, with a transfer event per attempt.

Storage is described by two base URLs (where inputs are read, where
outputs go); a file's URL is ``<base>/<scope>/<lfn>`` (inputs are also
looked up flat, ``<base>/<lfn>``, as shared-file-system sites lay them out).
Each attempt produces a :class:`TransferEvent`; the trace module turns those
into rucio-style traces. Failures become the PanDA code for their
direction, so the final update tells operators which side broke.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pilot.credentials import redact_url
from pilot.data.checksum import file_checksum
from pilot.data.copytools import url_to_path
from pilot.data.names import did, storage_url
from pilot.data.transfer import Copytool, TransferResult, remove_quietly
from pilot.errors import ErrorCode, PilotError
from pilot.job import FileSpec, Job

log = logging.getLogger(__name__)

# Codes a retry cannot fix: the file is not there, or not what it should be.
_FINAL = {
    ErrorCode.MISSINGINPUTFILE,
    ErrorCode.GETADMISMATCH,
    ErrorCode.GETMD5MISMATCH,
    ErrorCode.NOLOCALSPACE,
    ErrorCode.MISSINGOUTPUTFILE,
    ErrorCode.NOSTORAGEPROTOCOL,
    ErrorCode.UNKNOWNCOPYTOOL,
    ErrorCode.NOREPLICAS,
    ErrorCode.FILEEXISTS,
    ErrorCode.NOSTORAGE,
    ErrorCode.BADOUTPUTFILENAME,
    ErrorCode.MIDDLEWAREIMPORTFAILURE,
    ErrorCode.STAGEINAUTHENTICATIONFAILURE,
    ErrorCode.NOPROXY,
}
# Codes that say more than "stage-in/out failed" and reach the final update as they are.
_KEEP_IN = _FINAL | {
    ErrorCode.STAGEINTIMEOUT,
    ErrorCode.RUCIOSERVICEUNAVAILABLE,
    ErrorCode.SERVICENOTAVAILABLE,
}
_KEEP_OUT = {
    ErrorCode.MISSINGOUTPUTFILE,
    ErrorCode.NOREMOTESPACE,
    ErrorCode.STAGEOUTTIMEOUT,
    ErrorCode.PUTADMISMATCH,
    ErrorCode.FILEEXISTS,
    ErrorCode.NOSTORAGE,
    ErrorCode.NOPROXY,
    ErrorCode.BADOUTPUTFILENAME,
    ErrorCode.MIDDLEWAREIMPORTFAILURE,
    ErrorCode.RUCIOSERVICEUNAVAILABLE,
    ErrorCode.SERVICENOTAVAILABLE,
}


@dataclass
class TransferEvent:
    """One transfer attempt, as a trace records it."""

    direction: str  # "get" or "put"
    spec: FileSpec
    url: str
    protocol: str
    state: str  # PanDA trace clientState: DONE, STAGEIN_ATTEMPT_FAILED, ...
    reason: str = ""
    time_start: float = 0.0
    transfer_start: float = 0.0
    validate_start: float = 0.0
    time_end: float = 0.0
    size: int = 0
    hostname: str = field(default_factory=socket.gethostname)
    remote_site: str = ""  # the RSE that served or took the file, when the copytool knows


TransferSink = Callable[[TransferEvent], None]


def _file_url(base: str, spec: FileSpec) -> str:
    """``<base>/<scope>/<lfn>``; scope and name are checked again here, because a
    FileSpec need not come from a validated job."""
    return storage_url(base, spec.scope, spec.lfn, spec.kind)


def _candidates(base: str, spec: FileSpec) -> list[str]:
    urls = [_file_url(base, spec)]
    flat = storage_url(base, "", spec.lfn, spec.kind)
    if flat not in urls:
        urls.append(flat)
    return urls


def _verify(spec: FileSpec, result: TransferResult, local: Path) -> None:
    parts = spec.checksum_parts()
    if spec.fsize and result.size != spec.fsize:
        raise PilotError(
            ErrorCode.STAGEINFAILED,
            f"{spec.lfn}: size {result.size} differs from the job's {spec.fsize}",
        )
    if not parts:
        return
    kind, want = parts
    got = result.adler32 if kind == "adler32" else (result.md5 or file_checksum(local, "md5"))
    if got != want:
        code = ErrorCode.GETADMISMATCH if kind == "adler32" else ErrorCode.GETMD5MISMATCH
        raise PilotError(code, f"{spec.lfn}: {kind} {got} differs from the job's {want}")


def stage_in(
    job: Job,
    workdir: Path,
    copytool: Copytool,
    source: str,
    *,
    sink: TransferSink | None = None,
    attempts: int = 2,
    timeout: float = 0,
) -> list[FileSpec]:
    """Bring every input of ``job`` into ``workdir`` and check it against the job's checksum."""
    for spec in job.in_files:
        dest = workdir / spec.lfn
        last: PilotError | None = None
        by_did = getattr(copytool, "by_did", False)
        urls = [did(spec.scope, spec.lfn, "input")] if by_did else _candidates(source, spec)
        for attempt in range(max(1, attempts)):
            for url in urls:
                if not by_did and _is_local_missing(url):
                    last = PilotError(ErrorCode.MISSINGINPUTFILE, f"{spec.lfn} not found at {url}")
                    continue
                event = TransferEvent(
                    "get", spec, url, copytool.name, "INIT_REPORT", time_start=time.time()
                )
                try:
                    event.transfer_start = time.time()
                    if by_did:
                        result = copytool.get_did(spec, dest, timeout=timeout)  # type: ignore[attr-defined]
                    else:
                        result = copytool.get(url, dest, checksum=spec.checksum, timeout=timeout)
                    event.validate_start = time.time()
                    event.remote_site, event.url = result.rse, result.url or url
                    _verify(spec, result, dest)
                except PilotError as exc:
                    remove_quietly(dest)
                    last = exc
                    event.remote_site = event.remote_site or spec.ddm_endpoint
                    event.state, event.reason = "STAGEIN_ATTEMPT_FAILED", exc.diag
                    event.time_end = time.time()
                    _emit(sink, event)
                    if exc.code in _FINAL and exc.code != ErrorCode.MISSINGINPUTFILE:
                        raise
                    continue
                event.state, event.size, event.time_end = "DONE", result.size, time.time()
                _emit(sink, event)
                spec.local_path, spec.surl, spec.status = str(dest), url, "transferred"
                log.info("staged in %s (%d bytes) from %s", spec.lfn, result.size, redact_url(url))
                break
            if spec.status == "transferred":
                break
            if last is not None and last.code in _FINAL:
                break
            log.warning("stage-in of %s failed (attempt %d): %s", spec.lfn, attempt + 1, last)
        if spec.status != "transferred":
            err = last or PilotError(ErrorCode.STAGEINFAILED, spec.lfn)
            if err.code not in _KEEP_IN:
                err = PilotError(ErrorCode.STAGEINFAILED, err.diag)
            raise err
    return job.in_files


def _is_local_missing(url: str) -> bool:
    try:
        return not url_to_path(url).exists()
    except PilotError:
        return False


def output_destination(config: Any) -> str:
    """Where a job's files are stored: ``config.output_url``, else ``WORKDIR/storage``
    (``pilot run``'s default, kept by the event service and by ``pilot hpc``)."""
    return getattr(config, "output_url", "") or str(Path(config.workdir) / "storage")


def stage_out(
    files: list[FileSpec],
    workdir: Path,
    copytool: Copytool,
    destination: str,
    *,
    sink: TransferSink | None = None,
    attempts: int = 2,
    timeout: float = 0,
) -> list[FileSpec]:
    """Send ``files`` (outputs and log) from ``workdir`` to ``destination``.

    A missing or empty output fails the job before anything is sent: a
    half-written dataset is worse than a failed job.
    """
    for spec in files:
        local = Path(spec.local_path) if spec.local_path else workdir / spec.lfn
        if not local.is_file():
            raise PilotError(
                ErrorCode.MISSINGOUTPUTFILE, f"{spec.lfn} was not produced by the payload"
            )
        if local.stat().st_size == 0 and spec.kind == "output":
            raise PilotError(ErrorCode.EMPTYOUTPUTFILE, f"{spec.lfn} is empty")
        by_did = getattr(copytool, "by_did", False)
        url = did(spec.scope, spec.lfn, spec.kind) if by_did else _file_url(destination, spec)
        last: PilotError | None = None
        for attempt in range(max(1, attempts)):
            event = TransferEvent(
                "put", spec, url, copytool.name, "INIT_REPORT", time_start=time.time()
            )
            try:
                event.transfer_start = time.time()
                if by_did:
                    result = copytool.put_did(spec, local, timeout=timeout)  # type: ignore[attr-defined]
                else:
                    result = copytool.put(local, url, timeout=timeout)
            except PilotError as exc:
                last = exc
                event.remote_site = spec.ddm_endpoint
                event.state, event.reason, event.time_end = (
                    "STAGEOUT_ATTEMPT_FAILED",
                    exc.diag,
                    time.time(),
                )
                _emit(sink, event)
                log.warning("stage-out of %s failed (attempt %d): %s", spec.lfn, attempt + 1, exc)
                if exc.code in _FINAL:
                    break
                continue
            event.state, event.size, event.time_end = "DONE", result.size, time.time()
            event.remote_site, event.url = result.rse or spec.ddm_endpoint, result.url or url
            _emit(sink, event)
            spec.fsize, spec.checksum, spec.surl = (
                result.size,
                f"ad:{result.adler32}",
                result.url or url,
            )
            spec.local_path, spec.status = str(local), "transferred"
            break
        if spec.status != "transferred":
            err = last or PilotError(ErrorCode.STAGEOUTFAILED, spec.lfn)
            if err.code not in _KEEP_OUT:
                err = PilotError(ErrorCode.STAGEOUTFAILED, err.diag)
            raise err
    return files


def _emit(sink: TransferSink | None, event: TransferEvent) -> None:
    if sink is None:
        return
    try:
        sink(event)
    except OSError as exc:  # a trace that cannot be recorded never fails a job
        log.warning("could not record transfer trace for %s: %s", event.spec.lfn, exc)
