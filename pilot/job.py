"""Job, FileSpec and EventRange models, validated from PanDA's own dicts.

The PanDA server sends numbers as strings, ``"NULL"`` for absent values, and
per-file fields as comma-separated lists that must align. All of that is
checked here, once, so the rest of the pilot works with typed, trusted
objects. A bad definition raises :class:`PilotError` with a code and a
diagnostic naming the offending key; it never escapes as a traceback.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pilot.data.names import check_scope
from pilot.errors import ErrorCode, PilotError

MAX_LFN = 255
_NULLS = {"", "NULL", "None", "null"}
_CHECKSUM = re.compile(r"^(ad|adler32|md5):([0-9a-fA-F]+)$")
_RANGE_ID = re.compile(r"^[0-9]+-[0-9]+-[0-9]+-[0-9]+-[0-9]+$")


def is_null(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip() in _NULLS)


def _int(d: dict, key: str, default: int | None = None, *, minimum: int = 0) -> int:
    value = d.get(key)
    if is_null(value):
        if default is None:
            raise PilotError(ErrorCode.NOTDEFINED, f"job definition has no '{key}'")
        return default
    if isinstance(value, bool):
        raise PilotError(ErrorCode.CONVERSIONFAILURE, f"'{key}' must be an integer, got {value!r}")
    try:
        number = int(str(value).strip()) if not isinstance(value, int) else value
    except ValueError:
        try:
            as_float = float(str(value))
        except ValueError:
            raise PilotError(
                ErrorCode.CONVERSIONFAILURE, f"'{key}' must be an integer, got {value!r}"
            ) from None
        if not as_float.is_integer():
            raise PilotError(
                ErrorCode.CONVERSIONFAILURE, f"'{key}' must be an integer, got {value!r}"
            ) from None
        number = int(as_float)
    if number < minimum:
        raise PilotError(ErrorCode.CONVERSIONFAILURE, f"'{key}' must be >= {minimum}, got {number}")
    return number


def _str(d: dict, key: str, default: str | None = None) -> str:
    value = d.get(key)
    if is_null(value):
        if default is None:
            raise PilotError(ErrorCode.NOTDEFINED, f"job definition has no '{key}'")
        return default
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise PilotError(
            ErrorCode.CONVERSIONFAILURE, f"'{key}' must be a string, got {type(value).__name__}"
        )
    return str(value)


def _bool(d: dict, key: str) -> bool:
    value = d.get(key)
    if is_null(value):
        return False
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise PilotError(ErrorCode.CONVERSIONFAILURE, f"'{key}' must be True or False, got {value!r}")


def _list(d: dict, key: str) -> list[str]:
    value = d.get(key)
    if is_null(value):
        return []
    if isinstance(value, list):
        return ["" if is_null(v) else str(v).strip() for v in value]
    if not isinstance(value, str):
        raise PilotError(ErrorCode.CONVERSIONFAILURE, f"'{key}' must be a comma-separated list")
    return [v.strip() for v in value.split(",")]


def check_lfn(name: str, key: str = "file name") -> str:
    """A logical file name must be a plain name: it becomes a path in the work directory."""
    if not name or name in (".", ".."):
        raise PilotError(ErrorCode.BADOUTPUTFILENAME, f"empty or dot {key}")
    if len(name) > MAX_LFN:
        raise PilotError(
            ErrorCode.LFNTOOLONG, f"{key} longer than {MAX_LFN} characters: {name[:40]}..."
        )
    if "/" in name or "\\" in name or "\x00" in name or name.startswith(".."):
        raise PilotError(ErrorCode.BADOUTPUTFILENAME, f"{key} {name!r} is not a plain file name")
    if any(ord(c) < 32 for c in name):
        raise PilotError(ErrorCode.BADOUTPUTFILENAME, f"{key} {name!r} holds control characters")
    return name


def parse_checksum(value: str) -> tuple[str, str] | None:
    """``ad:0a1b2c3d`` -> ``("adler32", "0a1b2c3d")``; bare 8 hex digits count as adler32."""
    if is_null(value):
        return None
    m = _CHECKSUM.match(value.strip())
    if not m:
        if re.fullmatch(r"[0-9a-fA-F]{8}", value.strip()):
            return "adler32", value.strip().lower()
        raise PilotError(
            ErrorCode.UNKNOWNCHECKSUMTYPE,
            f"checksum {value!r} is neither ad:<8 hex> nor md5:<32 hex>",
        )
    kind = "adler32" if m.group(1) in ("ad", "adler32") else "md5"
    digest = m.group(2).lower()
    if (kind == "adler32" and len(digest) != 8) or (kind == "md5" and len(digest) != 32):
        raise PilotError(ErrorCode.UNKNOWNCHECKSUMTYPE, f"checksum {value!r} has the wrong length")
    return kind, digest


@dataclass
class FileSpec:
    """One input, output or log file of a job."""

    lfn: str
    kind: str  # "input", "output" or "log"
    guid: str = ""
    scope: str = ""
    fsize: int = 0
    checksum: str = ""  # "ad:<hex>" / "md5:<hex>" as PanDA writes it
    dataset: str = ""
    ddm_endpoint: str = ""
    destination_dblock: str = ""
    # filled in by stage-in/out
    local_path: str = ""
    surl: str = ""
    status: str = ""

    def checksum_parts(self) -> tuple[str, str] | None:
        return parse_checksum(self.checksum)


@dataclass(frozen=True, slots=True)  # slots: a third faster to make, and made per range
class EventRange:
    """A range of events of one input file, as getEventRanges hands it out."""

    event_range_id: str
    start_event: int
    last_event: int
    lfn: str
    guid: str = ""
    scope: str = ""
    pfn: str = ""

    @property
    def panda_id(self) -> int:
        return int(self.event_range_id.split("-")[1])

    @property
    def n_events(self) -> int:
        return self.last_event - self.start_event + 1

    @classmethod
    def from_panda(cls, d: Any) -> EventRange:
        if not isinstance(d, dict):
            raise PilotError(
                ErrorCode.MESSAGEHANDLINGFAILURE,
                f"event range must be an object, got {type(d).__name__}",
            )
        rid = d.get("eventRangeID")
        if not isinstance(rid, str) or not _RANGE_ID.match(rid):
            raise PilotError(ErrorCode.MESSAGEHANDLINGFAILURE, f"bad eventRangeID {rid!r}")
        start = _int(d, "startEvent")
        last = _int(d, "lastEvent")
        if last < start:
            raise PilotError(
                ErrorCode.MESSAGEHANDLINGFAILURE,
                f"range {rid}: lastEvent {last} < startEvent {start}",
            )
        lfn = check_lfn(_str(d, "LFN"), "LFN")
        return cls(
            rid, start, last, lfn, _str(d, "GUID", ""), _str(d, "scope", ""), _str(d, "PFN", "")
        )

    def to_panda(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "eventRangeID": self.event_range_id,
            "startEvent": self.start_event,
            "lastEvent": self.last_event,
            "LFN": self.lfn,
            "GUID": self.guid,
            "scope": self.scope,
        }
        if self.pfn:
            d["PFN"] = self.pfn
        return d


@dataclass
class Job:
    """A PanDA job definition, typed and validated."""

    panda_id: int
    transformation: str
    job_pars: str = ""
    jobset_id: int = 0
    task_id: int = 0
    job_name: str = ""
    attempt_nr: int = 0
    prod_source_label: str = "managed"
    core_count: int = 1
    max_walltime: int = 0  # s, 0 = no limit from the job
    min_ram_count: int = 0  # MB
    max_cpu_count: int = 0  # s
    max_disk_count: int = 0  # MB
    event_service: bool = False
    container_name: str = ""
    transfer_type: str = ""
    in_files: list[FileSpec] = field(default_factory=list)
    out_files: list[FileSpec] = field(default_factory=list)
    log_file: FileSpec | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_panda(cls, d: Any) -> Job:
        """Validate a job definition dict with PanDA's keys."""
        if not isinstance(d, dict):
            raise PilotError(
                ErrorCode.CONVERSIONFAILURE,
                f"job definition must be a JSON object, got {type(d).__name__}",
            )
        panda_id = _int(d, "PandaID", minimum=1)
        transformation = _str(d, "transformation").strip()
        if not transformation:
            raise PilotError(ErrorCode.NOTDEFINED, "job definition has an empty 'transformation'")
        job = cls(
            panda_id=panda_id,
            transformation=transformation,
            job_pars=_str(d, "jobPars", ""),
            jobset_id=_int(d, "jobsetID", 0),
            task_id=_int(d, "taskID", 0),
            job_name=_str(d, "jobName", ""),
            attempt_nr=_int(d, "attemptNr", 0),
            prod_source_label=_str(d, "prodSourceLabel", "managed"),
            core_count=max(1, _int(d, "coreCount", 1)),
            max_walltime=_int(d, "maxWalltime", 0),
            min_ram_count=_int(d, "minRamCount", 0),
            max_cpu_count=_int(d, "maxCpuCount", 0),
            max_disk_count=_int(d, "maxDiskCount", 0),
            event_service=_bool(d, "eventService"),
            container_name=_str(d, "container_name", ""),
            transfer_type=_str(d, "transferType", ""),
            raw=dict(d),
        )
        job.in_files = _inputs(d)
        job.out_files, job.log_file = _outputs(d)
        names = [f.lfn for f in job.in_files] + [f.lfn for f in job.out_files]
        if job.log_file:
            names.append(job.log_file.lfn)
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise PilotError(
                ErrorCode.FILEEXISTS, f"file names appear twice in the job: {sorted(dup)}"
            )
        return job

    @property
    def all_outputs(self) -> list[FileSpec]:
        return self.out_files + ([self.log_file] if self.log_file else [])


def _aligned(d: dict, master: str, keys: list[str]) -> dict[str, list[str]]:
    """Per-file lists must have the master list's length; an absent list is all-empty."""
    base = _list(d, master)
    out = {master: base}
    for key in keys:
        values = _list(d, key)
        if not values:
            values = [""] * len(base)
        elif len(values) == 1 and len(base) > 1 and key.startswith("scope"):
            values = values * len(base)
        if len(values) != len(base):
            raise PilotError(
                ErrorCode.NOTSAMELENGTH,
                f"'{key}' has {len(values)} entries but '{master}' has {len(base)}",
            )
        out[key] = values
    return out


def _size(value: str, lfn: str) -> int:
    if not value:
        return 0
    try:
        size = int(value)
    except ValueError:
        raise PilotError(
            ErrorCode.CONVERSIONFAILURE, f"fsize {value!r} of {lfn} is not an integer"
        ) from None
    if size < 0:
        raise PilotError(ErrorCode.CONVERSIONFAILURE, f"fsize {size} of {lfn} is negative")
    return size


def _inputs(d: dict) -> list[FileSpec]:
    cols = _aligned(
        d, "inFiles", ["GUID", "fsize", "checksum", "scopeIn", "realDatasetsIn", "ddmEndPointIn"]
    )
    files = []
    for i, lfn in enumerate(cols["inFiles"]):
        if not lfn:
            continue
        check_lfn(lfn, "input file name")
        checksum = cols["checksum"][i]
        parse_checksum(checksum)
        files.append(
            FileSpec(
                lfn=lfn,
                kind="input",
                guid=cols["GUID"][i],
                scope=check_scope(cols["scopeIn"][i], f"scopeIn of {lfn}", "input"),
                fsize=_size(cols["fsize"][i], lfn),
                checksum=checksum,
                dataset=cols["realDatasetsIn"][i],
                ddm_endpoint=cols["ddmEndPointIn"][i],
            )
        )
    return files


def _outputs(d: dict) -> tuple[list[FileSpec], FileSpec | None]:
    cols = _aligned(d, "outFiles", ["realDatasets", "destinationDblock", "ddmEndPointOut"])
    scopes = _list(d, "scopeOut")
    log_lfn = _str(d, "logFile", "")
    if log_lfn:
        check_lfn(log_lfn, "log file name")
    names = [n for n in cols["outFiles"]]
    # PanDA lists the log file as the last output; the model keeps it apart.
    log_index = names.index(log_lfn) if log_lfn and log_lfn in names else None
    outputs = []
    scope_i = 0
    for i, lfn in enumerate(names):
        if not lfn:
            continue
        check_lfn(lfn, "output file name")
        if i == log_index:
            continue
        scope = scopes[scope_i] if scope_i < len(scopes) else (scopes[-1] if scopes else "")
        check_scope(scope, f"scopeOut of {lfn}")
        scope_i += 1
        outputs.append(
            FileSpec(
                lfn=lfn,
                kind="output",
                scope=scope,
                dataset=cols["realDatasets"][i],
                destination_dblock=cols["destinationDblock"][i],
                ddm_endpoint=cols["ddmEndPointOut"][i],
            )
        )
    log = None
    if log_lfn:
        i = log_index if log_index is not None else None
        log = FileSpec(
            lfn=log_lfn,
            kind="log",
            guid=_str(d, "logGUID", ""),
            scope=check_scope(_str(d, "scopeLog", ""), "scopeLog"),
            dataset=cols["realDatasets"][i] if i is not None else "",
            destination_dblock=cols["destinationDblock"][i] if i is not None else "",
            ddm_endpoint=cols["ddmEndPointOut"][i] if i is not None else "",
        )
    return outputs, log


def load_job_file(path: str | Path) -> Job:
    """Read a job definition file: a PanDA job dict, or Harvester's ``{PandaID: job}``."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PilotError(ErrorCode.NOSUCHFILE, f"job file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PilotError(
            ErrorCode.FILEHANDLINGFAILURE, f"cannot read job file {path}: {exc}"
        ) from None
    return parse_job_text(text, str(path))


def parse_job_text(text: str, origin: str = "job definition") -> Job:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PilotError(
            ErrorCode.CONVERSIONFAILURE, f"{origin} is not valid JSON: {exc}"
        ) from None
    if isinstance(data, dict) and "PandaID" not in data and len(data) == 1:
        (only,) = data.values()
        if isinstance(only, dict):
            data = only
    return Job.from_panda(data)
