"""A picture per suite: outcome and time per template, both pilots, as plain SVG.

One row per template, one bar per pilot: its length is the median time from
hand-out to final update (the dispatcher's clock), a thin line spans the
fastest to the slowest of the N jobs, the colour says the outcome (green:
every job as expected, orange: some, red: none, grey: no final update),
and the label gives the typical ``state/pilotErrorCode`` and the count.
Written by hand: a few rectangles need no plotting library.
"""

from __future__ import annotations

from html import escape
from typing import Any

ROW = 46
BAR = 16
LEFT = 150
WIDTH = 560
RIGHT = 250
COLOURS = {"all": "#3a9d3a", "some": "#e69a22", "none": "#c83a3a", "missing": "#9a9a9a"}


def _colour(side: dict[str, Any]) -> str:
    if side["typical"]["state"] == "missing":
        return COLOURS["missing"]
    if side["as_expected"] == side["n"]:
        return COLOURS["all"]
    return COLOURS["some"] if side["as_expected"] else COLOURS["none"]


def suite_svg(report: dict[str, Any], suite: str) -> str:
    """The SVG of ``suite``'s templates in ``report``."""
    rows = [r for r in report["templates"] if suite in r["suites"]]
    names = report["names"]
    longest = max(
        [(r[s]["times"]["final_update"] or {}).get("max", 0) or 0 for r in rows for s in ("A", "B")]
        + [1.0]
    )
    scale = WIDTH / longest
    height = 70 + ROW * len(rows) + 40
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{LEFT + WIDTH + RIGHT}"'
        f' height="{height}" font-family="sans-serif" font-size="12">',
        '<rect width="100%" height="100%" fill="white"/>',
        f'<text x="10" y="20" font-size="15" font-weight="bold">suite {escape(suite)}:'
        f" {escape(names['A'])} (upper) and {escape(names['B'])} (lower),"
        f" {report['jobs_per_template']} jobs per template</text>",
        '<text x="10" y="38" fill="#555">bar: median seconds from hand-out to final update;'
        " line: fastest to slowest job; colour: outcome as expected for all, some, none</text>",
    ]
    top = 60
    for i, r in enumerate(rows):
        y0 = top + i * ROW
        mark = "" if r["agree"] else " *"
        out.append(
            f'<text x="10" y="{y0 + BAR + 4}" font-weight="bold">'
            f"{escape(r['template'])}{mark}</text>"
        )
        for j, s in enumerate(("A", "B")):
            side = r[s]
            y = y0 + j * (BAR + 2)
            t = side["times"]["final_update"] or {}
            med = t.get("median") or 0
            w = max(2.0, med * scale)
            out.append(
                f'<rect x="{LEFT}" y="{y}" width="{w:.1f}" height="{BAR}" fill="{_colour(side)}">'
                f"<title>{escape(names[s])}: {escape(str(side['typical']))}</title></rect>"
            )
            if t:
                x1, x2 = LEFT + t["min"] * scale, LEFT + t["max"] * scale
                yc = y + BAR / 2
                out.append(
                    f'<line x1="{x1:.1f}" y1="{yc}" x2="{x2:.1f}" y2="{yc}" stroke="black"/>'
                )
            label = (
                f"{names[s]}: {side['typical']['state']}/{side['typical']['pilotErrorCode']}"
                f" {side['as_expected']}/{side['n']}" + (f" {_seconds(med)}" if t else "")
            )
            out.append(f'<text x="{LEFT + w + 6:.1f}" y="{y + BAR - 3}">{escape(label)}</text>')
    axis_y = top + ROW * len(rows) + 6
    out.append(f'<line x1="{LEFT}" y1="{axis_y}" x2="{LEFT + WIDTH}" y2="{axis_y}" stroke="#333"/>')
    for k in range(6):
        x = LEFT + WIDTH * k / 5
        out.append(
            f'<line x1="{x:.1f}" y1="{axis_y}" x2="{x:.1f}" y2="{axis_y + 4}" stroke="#333"/>'
        )
        out.append(
            f'<text x="{x:.1f}" y="{axis_y + 16}" text-anchor="middle">{_seconds(longest * k / 5)}</text>'
        )
    out.append(
        f'<text x="10" y="{axis_y + 34}" fill="#555">* the pilots differ on this template</text>'
    )
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _seconds(t: float) -> str:
    """Seconds as an operator reads them: whole above 10 s, a decimal below."""
    return f"{t:.0f} s" if t >= 10 else f"{t:.1f} s"
