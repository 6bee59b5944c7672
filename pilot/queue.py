"""Queue configuration: PanDA's schedconfig JSON (the CRIC queue description).

The pilot takes its limits (memory, disk, walltime, cores), copytools and
container settings from the queue it serves. Sources, as the PanDA pilot
takes them: a URL (``--queuedata-url``, by default the server's
``/cache/schedconfig/<queue>.all.json``) or a local file; both the bare queue
dict and CRIC's ``{queue_name: {...}}`` form are accepted. When no source is
given the built-in defaults below apply, so a laptop or CI run needs none.

CRIC units are kept: ``maxrss`` and ``maxwdir`` in MB, ``maxtime`` in
seconds, ``timefloor`` in minutes. CRIC sends numbers as numbers, strings or
null; all three are accepted here, anything else is QUEUEDATANOTOK.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import requests

from pilot.errors import ErrorCode, PilotError

log = logging.getLogger(__name__)

DEFAULT_MAXRSS_MB = 2000
DEFAULT_MAXWDIR_MB = 14336
DEFAULT_COPYTOOL = "copy"


@dataclass
class QueueConfig:
    """One PanDA queue as the pilot needs it; ``raw`` keeps every CRIC key."""

    nickname: str
    panda_resource: str = ""
    state: str = "ACTIVE"
    status: str = "online"
    site: str = ""
    type: str = "production"
    resource_type: str = ""
    maxrss: int = DEFAULT_MAXRSS_MB
    maxwdir: int = DEFAULT_MAXWDIR_MB
    maxtime: int = 0
    corecount: int = 1
    timefloor: int = 0
    copytools: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {DEFAULT_COPYTOOL: {"setup": ""}}
    )
    acopytools: dict[str, list[str]] = field(default_factory=dict)
    astorages: dict[str, list[str]] = field(default_factory=dict)
    container_type: str = ""
    container_options: str = ""
    catchall: str = ""
    pilot_version: str = ""
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    # -- construction ----------------------------------------------------------------

    @classmethod
    def default(cls, name: str) -> QueueConfig:
        """The built-in queue: one core, 2000 MB, 14 GB of disk, the ``copy`` copytool."""
        return cls(nickname=name, panda_resource=name, site=name)

    @classmethod
    def from_dict(cls, data: Any, queue: str | None = None) -> QueueConfig:
        """Validate a queue description (bare, or ``{queue_name: {...}}``)."""
        d = unwrap(data, queue)
        q = cls(
            nickname=_text(d, "nickname"),
            panda_resource=_text(d, "panda_resource"),
            state=_text(d, "state", "ACTIVE"),
            status=_text(d, "status", "online"),
            site=_text(d, "site", ""),
            type=_text(d, "type", "production"),
            resource_type=_text(d, "resource_type", ""),
            maxrss=_number(d, "maxrss", DEFAULT_MAXRSS_MB),
            maxwdir=_number(d, "maxwdir", DEFAULT_MAXWDIR_MB),
            maxtime=_number(d, "maxtime", 0),
            corecount=max(1, _number(d, "corecount", 1)),
            timefloor=_number(d, "timefloor", 0),
            copytools=_copytools(d.get("copytools")),
            acopytools=_activity_lists(d, "acopytools"),
            astorages=_activity_lists(d, "astorages"),
            container_type=_text(d, "container_type", ""),
            container_options=_text(d, "container_options", ""),
            catchall=_text(d, "catchall", ""),
            pilot_version=_text(d, "pilot_version", ""),
            raw=dict(d),
        )
        q.validate()
        return q

    def validate(self) -> None:
        """PanDA's checks: a name, a resource, and an ACTIVE queue."""
        if not self.nickname.strip():
            raise PilotError(ErrorCode.QUEUEDATANOTOK, "queue description has no 'nickname'")
        if not self.panda_resource.strip():
            raise PilotError(
                ErrorCode.QUEUEDATANOTOK, f"queue {self.nickname} has no 'panda_resource'"
            )
        if self.state.upper() != "ACTIVE":
            raise PilotError(
                ErrorCode.QUEUEDATANOTOK, f"queue {self.nickname} is {self.state}, not ACTIVE"
            )

    def to_dict(self) -> dict[str, Any]:
        """The queue as CRIC writes it (what ``pilot serve`` answers)."""
        d = dict(self.raw)
        own = asdict(self)
        own.pop("raw")
        d.update(own)
        return d

    # -- what the pilot asks --------------------------------------------------------

    def copytools_for(self, activity: str) -> list[str]:
        """Copytools for an activity (``pr`` read, ``pw`` write, ``pl`` log ...), in order.

        CRIC's ``acopytools`` decides; ``default`` is the fallback activity, and
        then every configured copytool.
        """
        for key in (activity, "default"):
            tools = self.acopytools.get(key)
            if tools:
                return list(tools)
        return list(self.copytools) or [DEFAULT_COPYTOOL]

    def storages_for(self, activity: str) -> list[str]:
        for key in (activity, "default"):
            if self.astorages.get(key):
                return list(self.astorages[key])
        return []

    def container_for(self, what: str = "pilot") -> str:
        """Container technology for ``pilot`` or ``wrapper`` from ``container_type``
        (``"singularity:pilot;docker:wrapper"``); '' when none."""
        for part in self.container_type.split(";"):
            tech, _, target = part.partition(":")
            if target.strip() == what and tech.strip():
                return tech.strip()
        return ""

    def catchall_flags(self) -> dict[str, str]:
        """``catchall`` as ``key=value`` pairs and bare flags (value '')."""
        flags: dict[str, str] = {}
        for token in self.catchall.replace(",", " ").split():
            key, _, value = token.partition("=")
            flags[key] = value
        return flags

    @property
    def max_memory_mb(self) -> int:
        return self.maxrss

    @property
    def max_disk_mb(self) -> int:
        return self.maxwdir


def unwrap(data: Any, queue: str | None = None) -> dict[str, Any]:
    """The queue dict from the bare form or ``{queue_name: {...}}``."""
    if not isinstance(data, dict):
        raise PilotError(
            ErrorCode.QUEUEDATANOTOK,
            f"queue description must be a JSON object, got {type(data).__name__}",
        )
    if "nickname" in data or "panda_resource" in data:
        return data
    if queue is not None and isinstance(data.get(queue), dict):
        return data[queue]
    values = [v for v in data.values() if isinstance(v, dict)]
    if len(data) == 1 and len(values) == 1:
        return values[0]
    if queue is not None:
        raise PilotError(ErrorCode.QUEUEDATANOTOK, f"queue {queue} is not in the description")
    raise PilotError(ErrorCode.QUEUEDATANOTOK, "queue description has no 'nickname'")


def load_queue(
    source: str | Path | None,
    queue: str | None = None,
    *,
    timeout: float = 30.0,
    ca_path: str | None = None,
) -> QueueConfig:
    """Queue configuration from a URL or a file; the built-in defaults when ``source`` is None.

    A source that cannot be read is QUEUEDATA (1116); one that reads but is
    not a valid, active queue is QUEUEDATANOTOK (1117).
    """
    if source is None or str(source) == "":
        if not queue:
            raise PilotError(ErrorCode.QUEUEDATA, "no queue name and no queue description")
        return QueueConfig.default(queue)
    text = str(source)
    if text.startswith(("http://", "https://")):
        try:
            reply = requests.get(
                text,
                timeout=timeout,
                headers={"Accept": "application/json"},
                verify=ca_path or True,
            )
        except requests.RequestException as exc:
            raise PilotError(ErrorCode.QUEUEDATA, f"cannot fetch {text}: {exc}") from None
        if reply.status_code != 200:
            raise PilotError(ErrorCode.QUEUEDATA, f"{text} answered HTTP {reply.status_code}")
        body = reply.text
    else:
        path = Path(text[7:] if text.startswith("file://") else text)
        try:
            body = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise PilotError(ErrorCode.QUEUEDATA, f"cannot read {path}: {exc}") from None
    try:
        data = json.loads(body)
    except json.JSONDecodeError as exc:
        raise PilotError(ErrorCode.QUEUEDATANOTOK, f"{text} is not valid JSON: {exc}") from None
    return QueueConfig.from_dict(data, queue)


def resolve_queue(
    queue: str,
    *,
    queuedata_url: str | None = None,
    server_url: str | None = None,
    ca_path: str | None = None,
    timeout: float = 30.0,
    environ: dict[str, str] | None = None,
) -> QueueConfig:
    """The queue configuration from where the PanDA pilot would take it, in order:

    1. ``queuedata_url`` (``--queuedata-url``), a URL or a file: must work;
    2. ``$LOCAL_AGIS_SCHEDCONF``, a URL or a file: must work;
    3. the server the pilot pulls from (``/cache/schedconfig/<queue>.all.json``):
       when it cannot be read (no such path, server down) the built-in
       defaults apply, with a warning;
    4. the built-in defaults.

    A description that reads but is not valid or not ACTIVE always stops
    the pilot (QUEUEDATANOTOK): running jobs on an offline queue is worse
    than running none.
    """
    env = os.environ if environ is None else environ
    explicit = queuedata_url or env.get("LOCAL_AGIS_SCHEDCONF")
    if explicit:
        return load_queue(explicit, queue, timeout=timeout, ca_path=ca_path)
    if server_url:
        try:
            return load_queue(
                schedconfig_url(server_url, queue), queue, timeout=timeout, ca_path=ca_path
            )
        except PilotError as exc:
            if exc.code != ErrorCode.QUEUEDATA:
                raise
            log.warning("queue %s: %s; using the built-in defaults", queue, exc.detail)
    return QueueConfig.default(queue)


def schedconfig_url(server_url: str, queue: str) -> str:
    """Where a PanDA server (and ``pilot serve``) publishes one queue's description."""
    return f"{server_url.rstrip('/')}/cache/schedconfig/{queue}.all.json"


# -- field parsing --------------------------------------------------------------------


def _text(d: dict[str, Any], key: str, default: str | None = None) -> str:
    value = d.get(key)
    if value is None:
        if default is None:
            raise PilotError(ErrorCode.QUEUEDATANOTOK, f"queue description has no '{key}'")
        return default
    if isinstance(value, (dict, list)):
        raise PilotError(ErrorCode.QUEUEDATANOTOK, f"'{key}' must be a string")
    return str(value)


def queue_number(
    d: Mapping[str, Any], key: str, default: float = 0, *, code: int = ErrorCode.QUEUEDATANOTOK
) -> float:
    """A numeric queue setting: CRIC writes numbers as strings, None, "" or NULL when unset.

    ``code`` is the error a bad value gets: QUEUEDATANOTOK while the queue is
    read, BADQUEUECONFIGURATION where a limit is taken from it.
    """
    value = d.get(key)
    if value is None or value == "" or value == "NULL":
        return default
    if isinstance(value, bool):
        raise PilotError(code, f"queue '{key}' must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise PilotError(code, f"queue '{key}' must be a number, got {value!r}") from None
    if number < 0:
        raise PilotError(code, f"queue '{key}' must not be negative, got {value!r}")
    return number


def _number(d: dict[str, Any], key: str, default: int) -> int:
    return int(queue_number(d, key, default))


def _copytools(value: Any) -> dict[str, dict[str, Any]]:
    """CRIC: ``{"rucio": {"setup": ""}, ...}``; an older list of names is accepted too."""
    if value is None or value == "":
        return {DEFAULT_COPYTOOL: {"setup": ""}}
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return {v: {} for v in value}
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: (v if isinstance(v, dict) else {}) for k, v in value.items()}
    raise PilotError(ErrorCode.QUEUEDATANOTOK, "'copytools' must map copytool names to settings")


def _activity_lists(d: dict[str, Any], key: str) -> dict[str, list[str]]:
    value = d.get(key)
    if value is None or value == "":
        return {}
    if not isinstance(value, dict):
        raise PilotError(ErrorCode.QUEUEDATANOTOK, f"'{key}' must map activities to lists")
    out: dict[str, list[str]] = {}
    for activity, names in value.items():
        if isinstance(names, str):
            names = [n.strip() for n in names.split(",") if n.strip()]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise PilotError(
                ErrorCode.QUEUEDATANOTOK, f"'{key}.{activity}' must be a list of names"
            )
        out[str(activity)] = list(names)
    return out
