"""Queue clones: one copy of a production queue per pilot under commissioning.

PanDA commissions a pilot on clones of a real queue (``PQ_1`` keeps the old
pilot, ``PQ_2`` gets the new one), so both meet the same limits, copytools,
storages and container settings. Here the description is read as CRIC or
PanDA's cache gives it (``{queue: {...}}``, a bare queue, or a list of
them; a file or a URL) together with its storage endpoints (CRIC's
``ddmendpoints.json``), and every clone is served by the embedded
dispatcher under its own name.

A production queue's endpoints point at remote storage. For a local run
(``local_storage``) each endpoint the clone uses keeps its name and type,
but its protocols lead to a directory of this machine (``file://localhost``)
and the copytools become ``mv``, which both pilots know; every other queue
setting (memory, disk, walltime, cores, container type and options,
catchall, params) is kept as the queue has it. A queue that names no
storage at all gets one local endpoint, ``<clone>_LOCALDISK``.
"""

from __future__ import annotations

import copy
import json
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pilot.errors import ErrorCode, PilotError

ACTIVITIES = ("pr", "pw", "pl", "read_lan", "write_lan")
PROTOCOLS = ("read_lan", "read_wan", "write_lan", "write_wan")
LOCAL_COPYTOOL = "mv"
NAME_KEYS = ("nickname", "panda_resource", "name", "siteid", "panda_queue")


@dataclass
class Clone:
    """One queue as a pilot will see it: its description and the endpoints it names."""

    name: str
    queue: dict[str, Any]
    storages: dict[str, dict[str, Any]] = field(default_factory=dict)


def read_json_source(source: str | Path, what: str) -> Any:
    """JSON from a file path, ``file://`` or ``http(s)://`` URL; PilotError if unreadable."""
    text = str(source)
    try:
        if text.startswith(("http://", "https://", "file://")):
            with urllib.request.urlopen(text, timeout=60) as answer:  # noqa: S310 - operator's URL
                return json.loads(answer.read().decode("utf-8"))
        return json.loads(Path(text).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PilotError(ErrorCode.QUEUEDATA, f"cannot read the {what} {text}: {exc}") from None


def pick_queue(data: Any, name: str | None = None) -> dict[str, Any]:
    """The one queue of ``data``: bare, ``{queue: {...}}`` (CRIC) or a list of queues."""
    candidates: list[dict[str, Any]] = []
    if isinstance(data, list):
        candidates = [q for q in data if isinstance(q, dict)]
    elif isinstance(data, dict):
        if any(k in data for k in ("nickname", "panda_resource", "copytools", "maxrss")):
            candidates = [data]
        else:
            candidates = [dict(v, nickname=v.get("nickname") or k) for k, v in data.items()
                          if isinstance(v, dict)]  # fmt: skip
    if name:
        found = [q for q in candidates if name in {str(q.get(k) or "") for k in NAME_KEYS}]
        if found:
            return copy.deepcopy(found[0])
        raise PilotError(ErrorCode.QUEUEDATANOTOK, f"queue {name} is not in the description")
    if len(candidates) != 1:
        raise PilotError(
            ErrorCode.QUEUEDATANOTOK,
            f"the description holds {len(candidates)} queues: name the one to clone (--queue)",
        )
    return copy.deepcopy(candidates[0])


def pick_storages(data: Any) -> dict[str, dict[str, Any]]:
    """CRIC's endpoints as ``{name: {...}}`` (from that form or from a list with ``name``)."""
    if isinstance(data, list):
        data = {str(s.get("name")): s for s in data if isinstance(s, dict) and s.get("name")}
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise PilotError(ErrorCode.QUEUEDATANOTOK, "storage endpoints must be {name: {...}}")
    return copy.deepcopy(data)


def queue_name(queue: dict[str, Any]) -> str:
    for key in NAME_KEYS:
        if queue.get(key):
            return str(queue[key])
    raise PilotError(ErrorCode.QUEUEDATANOTOK, "the queue description has no nickname")


def named_storages(queue: dict[str, Any]) -> list[str]:
    """Every endpoint the queue's ``astorages`` names, in order, each once."""
    out: list[str] = []
    value = queue.get("astorages") or {}
    if isinstance(value, dict):
        for names in value.values():
            for name in names if isinstance(names, list) else [names]:
                if isinstance(name, str) and name and name not in out:
                    out.append(name)
    return out


def make_clone(
    queue: dict[str, Any],
    storages: dict[str, dict[str, Any]],
    name: str,
    *,
    storage_root: Path | None = None,
) -> Clone:
    """The queue under ``name``; with ``storage_root``, its endpoints made local there."""
    q = copy.deepcopy(queue)
    original = queue_name(queue)
    for key in NAME_KEYS:
        q[key] = name
    q.setdefault("site", q.get("atlas_site") or original)
    q.setdefault("atlas_site", q["site"])
    q.setdefault("state", "ACTIVE")
    q.setdefault("status", "online")
    q.setdefault("params", {})
    q["params"] = dict(q["params"] or {}, commission_clone_of=original)
    used = named_storages(q)
    out: dict[str, dict[str, Any]] = {}
    if storage_root is None:
        missing = [s for s in used if s not in storages]
        if missing:
            raise PilotError(
                ErrorCode.NOSTORAGE, f"queue {original} names unknown storages: {missing}"
            )
        return Clone(name, q, {s: copy.deepcopy(storages[s]) for s in used})
    if not used:
        used = [f"{name}_LOCALDISK"]
        q["astorages"] = {a: list(used) for a in ("pr", "pw", "pl")}
    for s in used:
        desc = copy.deepcopy(storages.get(s) or {"name": s, "type": "DATADISK"})
        path = storage_root / s
        path.mkdir(parents=True, exist_ok=True)
        endpoint = [{"endpoint": "file://localhost", "path": str(path), "flavour": "POSIX"}]
        desc.update(
            name=s,
            site=desc.get("site") or q["site"],
            state="ACTIVE",
            is_deterministic=bool(desc.get("is_deterministic", True)),
            is_tape=False,
            arprotocols={p: copy.deepcopy(endpoint) for p in PROTOCOLS},
            rprotocols={},
        )
        out[s] = desc
    q["copytools"] = {LOCAL_COPYTOOL: {"setup": ""}}
    q["acopytools"] = {a: [LOCAL_COPYTOOL] for a in ("pr", "pw", "pl")}
    return Clone(name, q, out)


def default_queue(name: str) -> dict[str, Any]:
    """A plain grid queue as CRIC describes one, for a run given no description."""
    return {
        "nickname": name,
        "panda_resource": name,
        "site": name,
        "atlas_site": name,
        "state": "ACTIVE",
        "status": "online",
        "type": "production",
        "maxrss": 2000,
        "maxwdir": 14336,
        "maxtime": 3600,
        "maxinputsize": 14336,
        "corecount": 1,
        "container_type": "",
        "is_cvmfs": False,
        "params": {},
    }


def load_clones(
    description: str | Path | None,
    endpoints: str | Path | None,
    names: list[str],
    *,
    queue: str | None = None,
    storage_root: Path | None = None,
) -> tuple[str, list[Clone]]:
    """(original queue name, one clone per name) from the operator's sources.

    ``{queue}`` in a name stands for the original queue's name.
    """
    if description:
        q = pick_queue(read_json_source(description, "queue description"), queue)
    else:
        q = default_queue(queue or "COMMISSION")
    storages = pick_storages(read_json_source(endpoints, "storage endpoints")) if endpoints else {}
    original = queue_name(q)
    names = [n.format(queue=original) for n in names]
    if len(set(names)) != len(names):
        raise PilotError(ErrorCode.QUEUEDATANOTOK, f"clone names must differ: {names}")
    root = storage_root
    clones = [
        make_clone(q, storages, n, storage_root=root / n if root is not None else None)
        for n in names
    ]
    return original, clones
