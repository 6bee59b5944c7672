"""Timeline picture of an event-service run: one lane per droid, one bar per range.

Where the times come from: Yoda's journal (``yoda.journal``, read through
``pilot hpc journal --results``, one JSON result per line) names the droid
rank of every result and the payload's own wall time per range, but carries
no clock time. A finished range's output file is
renamed into place, not rewritten, so its modification time is the moment the
payload finished writing it: that is the bar's end, and end minus the
payload's wall time its start. Ranges without an output (failed, fatal) end
when the dispatcher recorded their update, the nearest upper bound there is.
Results that carry their own clock times (``started``/``ended``, epoch
seconds) are drawn from those instead. Without a journal (single-node mode) the dispatcher's own times are used: a
range spans from its dispatch to its update.

The journal is read through the command rather than imported, since
``pilot`` does not depend on ``yoda`` (docs/DESIGN.md).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pilot.errors import ErrorCode, PilotError

STATUS_COLOURS = {"finished": "#2a9d8f", "failed": "#e9a23b", "fatal": "#c0392b"}
MIN_BAR = 0.002  # seconds; a range that took less still shows as a sliver


@dataclass(frozen=True)
class RangeSpan:
    """One range on one lane, in epoch seconds."""

    lane: str
    range_id: str
    start: float
    end: float
    status: str
    cpu: float = 0.0


@dataclass(frozen=True)
class JournalResult:
    """One terminal result as Yoda journaled it."""

    droid: int
    range_id: str
    status: str
    output_path: str
    wall: float
    cpu: float
    started: float | None = None  # clock times, where the result carries them
    ended: float | None = None


def results_from_dump(lines: Iterable[str]) -> list[JournalResult]:
    """Results from ``pilot hpc journal --results`` output (one JSON object per line)."""
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            res = json.loads(line)
            out.append(
                JournalResult(
                    droid=int(res["droid"]),
                    range_id=str(res["event_range_id"]),
                    status=str(res["status"]),
                    output_path=str(res.get("output_path") or ""),
                    wall=float(res.get("wall") or 0.0),
                    cpu=float(res.get("cpu") or 0.0),
                    started=_epoch(res.get("started")),
                    ended=_epoch(res.get("ended")),
                )
            )
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise PilotError(
                ErrorCode.FILEHANDLINGFAILURE, f"journal dump line {i + 1}: bad result {exc}"
            ) from None
    return out


def _epoch(value: Any) -> float | None:
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def spans_from_journal(
    results: Iterable[JournalResult], updated_at: Mapping[str, float] | None = None
) -> list[RangeSpan]:
    """Bars from journaled results: end = output mtime, else the dispatcher's update time."""
    updated_at = updated_at or {}
    spans = []
    for r in results:
        if r.started is not None and r.ended is not None:
            end = max(r.ended, r.started + MIN_BAR)
            spans.append(RangeSpan(f"droid {r.droid}", r.range_id, r.started, end, r.status, r.cpu))
            continue
        end = None
        if r.output_path:
            try:
                end = os.stat(r.output_path).st_mtime
            except OSError:
                end = None
        if end is None:
            end = updated_at.get(r.range_id)
        if end is None:
            continue
        wall = max(r.wall, MIN_BAR)
        spans.append(RangeSpan(f"droid {r.droid}", r.range_id, end - wall, end, r.status, r.cpu))
    return spans


def spans_from_dispatcher(ranges: Iterable[Mapping[str, Any]], lane: str) -> list[RangeSpan]:
    """Bars from the dispatcher's range rows (``dispatched`` .. ``modified``), one lane."""
    spans = []
    for r in ranges:
        status = r.get("status")
        if status not in STATUS_COLOURS or r.get("dispatched") is None or r.get("modified") is None:
            continue
        start, end = float(r["dispatched"]), float(r["modified"])
        spans.append(
            RangeSpan(lane, str(r["range_id"]), start, max(end, start + MIN_BAR), str(status))
        )
    return spans


def _lane_key(lane: str) -> tuple[int, str]:
    word = lane.rsplit(" ", 1)[-1]
    return (int(word), lane) if word.isdigit() else (1 << 30, lane)


def draw_timeline(
    spans: list[RangeSpan], path: str | Path, *, title: str = "", t0: float | None = None
) -> Path:
    """Write the picture (PNG) to ``path``. PilotError when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed, and none is opened
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError as exc:
        raise PilotError(
            ErrorCode.GENERALERROR,
            f"matplotlib is needed for the timeline ({exc}); pip install 'panda-hpc-pilot[demo]'",
        ) from None
    path = Path(path)
    lanes = sorted({s.lane for s in spans}, key=_lane_key)
    origin = t0 if t0 is not None else min((s.start for s in spans), default=0.0)
    # a bar narrower than about a pixel would not be drawn at all
    horizon = max((s.end for s in spans), default=origin + 1.0) - origin
    least = max(MIN_BAR, horizon / 1000.0)
    fig, ax = plt.subplots(figsize=(11, 1.4 + 0.55 * max(1, len(lanes))), dpi=100)
    try:
        for i, lane in enumerate(lanes):
            for status, colour in STATUS_COLOURS.items():
                bars = [
                    (s.start - origin, max(s.end - s.start, least))
                    for s in spans
                    if s.lane == lane and s.status == status
                ]
                if bars:
                    ax.broken_barh(
                        bars, (i - 0.38, 0.76), facecolors=colour, edgecolors="white", linewidth=0.2
                    )
        ax.set_yticks(range(len(lanes)))
        ax.set_yticklabels(lanes)
        ax.set_ylim(-0.7, max(1, len(lanes)) - 0.3)
        ax.invert_yaxis()
        ax.set_xlabel("seconds since start")
        ax.set_xlim(left=0)
        ax.grid(axis="x", alpha=0.3)
        ax.set_title(title or f"{len(spans)} event ranges on {len(lanes)} lanes")
        present = {s.status for s in spans}
        handles = [Patch(color=c, label=k) for k, c in STATUS_COLOURS.items() if k in present]
        if handles:
            ax.legend(handles=handles, loc="upper right", fontsize="small")
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.part")
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
    return path
