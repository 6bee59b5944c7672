"""Commissioning templates: job definitions with the outcome a correct pilot gives them.

A template is a JSON file ``{"name", "expect": {"state", "pilotErrorCode"}, "job"}``
where ``job`` is a PanDA job definition without a PandaID (the dispatcher
numbers it). The shipped set covers the outcomes a site meets first: a
clean job with an output, a payload error exit, a segfault, a missing
transform and a missing output.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pilot.errors import ErrorCode, PilotError

SHIPPED = Path(__file__).resolve().parent / "templates"


@dataclass(frozen=True)
class Template:
    name: str
    job: dict[str, Any]
    expect_state: str = ""
    expect_code: int | None = None


def load_templates(
    directory: str | Path | None = None, names: list[str] | None = None
) -> list[Template]:
    """Templates of ``directory`` (the shipped set by default), sorted by name."""
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
        if not isinstance(data, dict) or not isinstance(data.get("job"), dict):
            raise PilotError(
                ErrorCode.CONVERSIONFAILURE, f"template {path.name} has no 'job' object"
            )
        expect = data.get("expect") or {}
        code = expect.get("pilotErrorCode")
        out.append(
            Template(
                name=str(data.get("name") or path.stem),
                job=dict(data["job"]),
                expect_state=str(expect.get("state") or ""),
                expect_code=int(code) if code is not None else None,
            )
        )
    if names:
        wanted = set(names)
        out = [t for t in out if t.name in wanted]
        missing = wanted - {t.name for t in out}
        if missing:
            raise PilotError(ErrorCode.NOSUCHFILE, f"unknown templates: {sorted(missing)}")
    return out
