"""The invariant of docs/DESIGN.md: every range handed out upstream ends in exactly one
terminal report or is released; none is reported twice; each finished range's output
exists with the reported checksum."""

from __future__ import annotations

import zlib
from collections import Counter
from pathlib import Path
from typing import Any

TERMINAL = {"finished", "failed", "fatal"}


def adler32_of(path: str | Path) -> str:
    value = 1
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            value = zlib.adler32(block, value)
    return f"{value & 0xFFFFFFFF:08x}"


def check(
    dispatched: list[str],
    updates: list[dict[str, Any]],
    *,
    released: set[str] | None = None,
    require_all: bool = True,
    outputs: dict[str, tuple[str, int, str]] | None = None,
) -> list[str]:
    """Problems found (empty list: all good)."""
    problems = []
    terminal = [u for u in updates if u.get("eventStatus") in TERMINAL]
    counts = Counter(u["eventRangeID"] for u in terminal)
    twice = sorted(rid for rid, n in counts.items() if n > 1)
    if twice:
        problems.append(f"{len(twice)} ranges reported twice, e.g. {twice[:3]}")
    handed = set(dispatched)
    unknown = sorted(set(counts) - handed)
    if unknown:
        problems.append(f"{len(unknown)} reports for ranges never handed out: {unknown[:3]}")
    missing = sorted(handed - set(counts) - (released or set()))
    if require_all and missing:
        problems.append(f"{len(missing)} ranges neither reported nor released: {missing[:3]}")
    if outputs is not None:
        for u in terminal:
            if u["eventStatus"] != "finished":
                continue
            rid = u["eventRangeID"]
            if rid not in outputs:
                problems.append(f"no output recorded for finished range {rid}")
                continue
            path, size, adler = outputs[rid]
            p = Path(path)
            if not p.is_file():
                problems.append(f"output of {rid} missing: {p}")
            elif p.stat().st_size != size or adler32_of(p) != adler:
                problems.append(f"output of {rid} does not match its size or checksum")
    return problems


def journal_outputs(path: str | Path) -> dict[str, tuple[str, int, str]]:
    """Outputs of finished ranges as Yoda journaled them: id -> (path, fsize, adler32)."""
    from yoda.journal import journal_results

    return {
        r.event_range_id: (r.output_path, r.fsize, r.adler32)
        for _, r in journal_results(path)
        if r.status.value == "finished"
    }
