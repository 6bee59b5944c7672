"""Which copytool moves which files: the queue's ``acopytools`` per activity, or ``--copytool``.

A PanDA queue (CRIC's schedconfig) lists its copytools (``copytools``) and,
per activity, which of them to use in order (``acopytools``): ``pr`` reads
inputs, ``pw`` writes outputs, ``pl`` writes the log, ``es_events`` writes
event-service outputs, ``default`` serves any activity without its own list.
``--copytool`` overrides all of them. The first copytool of the list that
can be made here is used; one that is unknown or not installed is skipped
with a warning, so a queue listing ``["rucio", "copy"]`` still works on a
node without rucio-clients (see docs/DESIGN.md, data management).
"""

from __future__ import annotations

import logging
from typing import Any

from pilot.data.copytools import DEFAULT_NAME, Copytool, make_copytool
from pilot.errors import ErrorCode, PilotError

log = logging.getLogger(__name__)

# where an activity looks, in order, in acopytools (PanDA's activity names)
FALLBACKS: dict[str, tuple[str, ...]] = {
    "pr": ("pr", "read_lan", "default"),
    "pw": ("pw", "write_lan", "default"),
    "pl": ("pl", "pw", "write_lan", "default"),
    "es_events": ("es_events", "pw", "write_lan", "default"),
}
ACTIVITIES = tuple(FALLBACKS)


def copytool_names(config: Any, activity: str) -> list[str]:
    """The copytools for ``activity``, in the order they are tried."""
    if activity not in FALLBACKS:
        raise ValueError(f"unknown transfer activity {activity!r}")
    override = getattr(config, "copytool", "") or ""
    if override:
        return [override]
    queue = getattr(config, "queue", None) or {}
    acopytools = queue.get("acopytools") or {}
    if isinstance(acopytools, dict):
        for key in FALLBACKS[activity]:
            names = acopytools.get(key)
            if isinstance(names, str):
                names = [n.strip() for n in names.split(",") if n.strip()]
            if names:
                return [str(n) for n in names]
    tools = queue.get("copytools")
    if isinstance(tools, dict) and tools:
        return list(tools)
    if isinstance(tools, list) and tools:
        return [str(t) for t in tools]
    return [DEFAULT_NAME]


def uses_rucio(config: Any) -> bool:
    return any("rucio" in copytool_names(config, a) for a in ACTIVITIES)


def options_for(config: Any, name: str) -> dict[str, Any]:
    if name == "rucio":
        return {"rucio": getattr(config, "rucio", None)}
    return dict(getattr(config, "copytool_options", None) or {})


def copytool_for(config: Any, activity: str, made: dict[str, Copytool] | None = None) -> Copytool:
    """The copytool that serves ``activity`` under ``config``; ``made`` shares one instance
    per name between activities (one Rucio client, one token, for a job's files)."""
    names = copytool_names(config, activity)
    skipped: list[str] = []
    for name in names:
        if made is not None and name in made:
            return made[name]
        try:
            tool = make_copytool(name, **options_for(config, name))
            if made is not None:
                made[name] = tool
            return tool
        except PilotError as exc:
            if exc.code not in (ErrorCode.UNKNOWNCOPYTOOL, ErrorCode.MIDDLEWAREIMPORTFAILURE):
                raise
            if len(names) == 1:
                raise
            log.warning("copytool %s for %s cannot be used: %s", name, activity, exc.detail)
            skipped.append(f"{name}: {exc.detail}")
    raise PilotError(
        ErrorCode.UNKNOWNCOPYTOOL, f"no copytool for {activity} can be used ({'; '.join(skipped)})"
    )
