"""Commissioning templates and suites: job definitions with the outcome a correct pilot gives.

A template is a JSON file::

    {"name", "suites": ["short", ...],
     "expect": {"state", "pilotErrorCode", "transExitCode", "exeErrorCode"},
     "why": {"pilotErrorCode": "PanDA's reason for it", ...},
     "job": {...} | "task": {...}}

where ``job`` is a PanDA job definition without a PandaID (the dispatcher
numbers it) and ``task`` an event-service task as ``/admin/tasks`` takes
it. Each ``expect`` key is PanDA's convention for that outcome, and
``why`` says which; a key left out is shown and compared, never judged.

Suites are HammerCloud's stages: ``short`` (a clean job with an output),
``failure`` (a payload error exit, a segfault, a missing transform, a
missing output), ``long`` (a payload that runs for minutes), ``container``
(the payload in the queue's container) and ``es`` (an event-service job).
``default`` is ``short`` and ``failure``: what a new pilot meets first,
and what ``pilot commission`` runs unless told otherwise; ``all`` is every
template.

:func:`template_from_job` turns a real job definition (a getJob answer or
PanDA's job JSON) into a template, so a production job can be replayed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pilot.errors import ErrorCode, PilotError

SHIPPED = Path(__file__).resolve().parent / "templates"
SUITES = ("short", "failure", "long", "container", "es")
DEFAULT_SUITE = ("short", "failure")
EXPECT_KEYS = ("state", "pilotErrorCode", "transExitCode", "exeErrorCode")
#: Fields of a job definition that belong to one job, never to a template.
PER_JOB = ("PandaID", "StatusCode", "jobsetID", "taskID", "jediTaskID", "attemptNr")


@dataclass(frozen=True)
class Template:
    name: str
    job: dict[str, Any]
    expect: dict[str, Any] = field(default_factory=dict)
    why: dict[str, str] = field(default_factory=dict)
    suites: tuple[str, ...] = ("short",)
    task: dict[str, Any] | None = None

    @property
    def expect_state(self) -> str:
        return str(self.expect.get("state") or "")

    @property
    def expect_code(self) -> int | None:
        code = self.expect.get("pilotErrorCode")
        return int(code) if code is not None else None


def parse_template(data: Any, name: str) -> Template:
    """A template from its JSON object; PilotError (1008) when it is not one."""
    if not isinstance(data, dict) or not (
        isinstance(data.get("job"), dict) or isinstance(data.get("task"), dict)
    ):
        raise PilotError(ErrorCode.CONVERSIONFAILURE, f"template {name} has no 'job' object")
    expect = data.get("expect") or {}
    if not isinstance(expect, dict) or set(expect) - set(EXPECT_KEYS):
        raise PilotError(
            ErrorCode.CONVERSIONFAILURE, f"template {name}: 'expect' takes {', '.join(EXPECT_KEYS)}"
        )
    clean = {k: (str(v) if k == "state" else int(v)) for k, v in expect.items() if v is not None}
    suites = data.get("suites") or ["short"]
    if isinstance(suites, str):
        suites = [suites]
    unknown = set(suites) - set(SUITES)
    if unknown:
        raise PilotError(
            ErrorCode.CONVERSIONFAILURE, f"template {name}: unknown suites {sorted(unknown)}"
        )
    task = data.get("task") if isinstance(data.get("task"), dict) else None
    job = dict(data["job"]) if isinstance(data.get("job"), dict) else dict(task["job"])  # type: ignore[index]
    return Template(
        name=str(data.get("name") or name),
        job=job,
        expect=clean,
        why={str(k): str(v) for k, v in (data.get("why") or {}).items()},
        suites=tuple(suites),
        task=dict(task) if task else None,
    )


def suite_members(suite: str) -> tuple[str, ...]:
    """The stages a suite name stands for (``default``, ``all``, one stage, or ``a,b``)."""
    if suite == "default":
        return DEFAULT_SUITE
    if suite == "all":
        return SUITES
    parts = tuple(s.strip() for s in suite.split(",") if s.strip())
    unknown = set(parts) - set(SUITES)
    if not parts or unknown:
        raise PilotError(
            ErrorCode.NOSUCHFILE,
            f"unknown suite {suite!r}: default, all, or of {', '.join(SUITES)}",
        )
    return parts


def load_templates(
    directory: str | Path | None = None,
    names: list[str] | None = None,
    suite: str | None = None,
) -> list[Template]:
    """Templates of ``directory`` (the shipped set by default), sorted by name.

    ``names`` picks templates by name; ``suite`` by stage. Without either,
    every template of the directory.
    """
    root = Path(directory) if directory else SHIPPED
    files = sorted(root.glob("*.json"))
    if not files:
        raise PilotError(ErrorCode.NOSUCHFILE, f"no commissioning templates (*.json) in {root}")
    out = []
    for path in files:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise PilotError(ErrorCode.CONVERSIONFAILURE, f"template {path.name}: {exc}") from None
        out.append(parse_template(data, path.stem))
    if suite:
        stages = set(suite_members(suite))
        out = [t for t in out if stages & set(t.suites)]
    if names:
        wanted = set(names)
        out = [t for t in out if t.name in wanted]
        missing = wanted - {t.name for t in out}
        if missing:
            raise PilotError(ErrorCode.NOSUCHFILE, f"unknown templates: {sorted(missing)}")
    return out


def template_from_job(job: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    """A template (JSON object) from a real job definition: its per-job fields removed.

    The outcome is not known from a definition, so nothing is expected: the
    two pilots are compared with each other only.
    """
    if not isinstance(job, dict) or not job.get("transformation"):
        raise PilotError(ErrorCode.CONVERSIONFAILURE, "a job definition needs a 'transformation'")
    definition = {k: v for k, v in job.items() if k not in PER_JOB}
    definition["attemptNr"] = "1"
    label = name or str(job.get("jobName") or f"job-{job.get('PandaID', 'x')}")
    return {"name": label, "suites": ["short"], "expect": {}, "job": definition}
