"""The invariant of DESIGN.md: every range handed out upstream ends in exactly one
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
    check_outputs: bool = True,
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
    if check_outputs:
        for u in terminal:
            if u["eventStatus"] != "finished" or "path" not in u:
                continue
            p = Path(u["path"])
            if not p.is_file():
                problems.append(f"output of {u['eventRangeID']} missing: {p}")
            elif u.get("chksum") and adler32_of(p) != u["chksum"]:
                problems.append(f"output of {u['eventRangeID']} has the wrong checksum")
    return problems
