"""What the dispatcher saw of each commissioning job, and the two pilots set side by side.

Only the server's records count, as in PanDA monitoring: the final update's
state, codes, diagnostics and reported files (PanDA's ``xml`` field, JSON
``{lfn: {fsize, adler32, ...}}``), the sequence of updates, and the times
the dispatcher itself measured: when the job was handed out, when its first
and its final update arrived. A pilot's own ``startTime``/``endTime`` are
kept too, as its claim.

Over N jobs of a template each side gets a success rate (jobs with the
expected outcome; ``finished`` share too) and a distribution of every code.
A difference is flagged per field; where the template states PanDA's
convention for that field (``expect``), the side that meets it is judged
right, with the template's reason.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from pilot.comm.pandaapi import epoch_of
from pilot.commission.templates import Template
from pilot.server.db import Store

CODE_FIELDS = ("state", "pilotErrorCode", "exeErrorCode", "transExitCode")
SIDES = ("A", "B")


def _int(value: Any) -> int:
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return 0


@dataclass
class JobOutcome:
    """One job as the dispatcher recorded it. Times in seconds after it was handed out."""

    panda_id: int
    state: str = "missing"  # no final update arrived
    pilotErrorCode: int = 0  # noqa: N815 - PanDA's field names
    exeErrorCode: int = 0  # noqa: N815
    transExitCode: int = 0  # noqa: N815
    pilotErrorDiag: str = ""  # noqa: N815
    exeErrorDiag: str = ""  # noqa: N815
    files: list[dict[str, Any]] = field(default_factory=list)
    updates: list[str] = field(default_factory=list)
    handed_out: float | None = None  # seconds after the job was loaded
    handed_out_at: float | None = None  # the dispatcher's clock (epoch)
    first_update: float | None = None
    final_update: float | None = None
    claimed_wall: float | None = None  # endTime - startTime, as the pilot says
    pilot_id: str = ""

    def value(self, name: str) -> Any:
        return getattr(self, name)


def _files(xml: Any) -> list[dict[str, Any]]:
    try:
        data = json.loads(xml) if isinstance(xml, str) and xml else {}
    except ValueError:
        return [{"lfn": "?", "error": "xml is not JSON"}]
    if not isinstance(data, dict):
        return []
    out = []
    for lfn, info in sorted(data.items()):
        info = info if isinstance(info, dict) else {}
        out.append(
            {"lfn": lfn, "fsize": _int(info.get("fsize")), "adler32": info.get("adler32", "")}
        )
    return out


def read_outcome(store: Store, panda_id: int) -> JobOutcome:
    """The job's outcome from the dispatcher's tables."""
    job = store.job(panda_id) or {}
    ups = [u for u in store.updates(panda_id) if u["disposition"] == "recorded"]
    out = JobOutcome(panda_id, updates=[u["state"] for u in ups])
    created, dispatched = job.get("created"), job.get("dispatched")
    if dispatched:
        out.handed_out = round(dispatched - created, 2) if created else None
        out.handed_out_at = round(dispatched, 3)
        if ups:
            out.first_update = round(ups[0]["received"] - dispatched, 2)
    finals = store.final_records(panda_id)
    if not finals:
        return out
    final = finals[-1]
    f = final["fields"]
    out.state = str(f.get("state") or final["state"])
    out.pilotErrorCode = _int(f.get("pilotErrorCode"))
    out.exeErrorCode = _int(f.get("exeErrorCode"))
    out.transExitCode = _int(f.get("transExitCode"))
    out.pilotErrorDiag = str(f.get("pilotErrorDiag") or "")[:256]
    out.exeErrorDiag = str(f.get("exeErrorDiag") or "")[:256]
    out.files = _files(f.get("xml"))
    out.pilot_id = str(f.get("pilotID") or "")
    if dispatched:
        out.final_update = round(final["received"] - dispatched, 2)
    try:
        claimed = epoch_of(f.get("endTime", 0)) - epoch_of(f.get("startTime", 0))
        out.claimed_wall = round(claimed, 2) if claimed > 0 else None
    except (TypeError, ValueError):
        out.claimed_wall = None
    return out


def _mode(values: list[Any]) -> Any:
    return Counter(values).most_common(1)[0][0] if values else None


def _spread(values: list[float | None]) -> dict[str, float] | None:
    got = [v for v in values if v is not None]
    if not got:
        return None
    return {"min": min(got), "median": round(statistics.median(got), 2), "max": max(got)}


def meets(template: Template, o: JobOutcome) -> bool:
    """True when the job has every outcome the template expects (no expectation: finished)."""
    if not template.expect:
        return o.state == "finished"
    return all(o.value(k) == v for k, v in template.expect.items())


def summarise(template: Template, jobs: list[JobOutcome]) -> dict[str, Any]:
    """One side's N jobs of a template: rates, code distributions, typical values, times."""
    n = len(jobs)
    out: dict[str, Any] = {
        "n": n,
        "as_expected": sum(meets(template, o) for o in jobs),
        "finished": sum(o.state == "finished" for o in jobs),
        "success_rate": round(sum(meets(template, o) for o in jobs) / n, 3) if n else 0.0,
        "distributions": {k: dict(Counter(str(o.value(k)) for o in jobs)) for k in CODE_FIELDS},
        "typical": {k: _mode([o.value(k) for o in jobs]) for k in CODE_FIELDS},
        "pilotErrorDiag": _mode([o.pilotErrorDiag for o in jobs]) or "",
        "exeErrorDiag": _mode([o.exeErrorDiag for o in jobs]) or "",
        "updates": list(_mode([tuple(o.updates) for o in jobs]) or ()),
        "files": _mode([json.dumps(_kept_files(o.files)) for o in jobs]),
        "times": {
            "handed_out": _spread([o.handed_out for o in jobs]),
            "first_update": _spread([o.first_update for o in jobs]),
            "final_update": _spread([o.final_update for o in jobs]),
            "claimed_wall": _spread([o.claimed_wall for o in jobs]),
        },
    }
    out["files"] = json.loads(out["files"]) if out["files"] else []
    return out


def _kept_files(files: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Outputs compared as files: a log tarball's size and checksum differ by nature."""
    return [dict(f, log=True, fsize=None, adler32=None) if _is_log(f["lfn"]) else f for f in files]


def _is_log(lfn: str) -> bool:
    return lfn.endswith((".log.tgz", ".log.tar.gz")) or ".log." in lfn


@dataclass
class Difference:
    """A field on which the two sides differ; ``right`` is A, B, neither or '' (undecided)."""

    field: str
    a: Any
    b: Any
    right: str = ""
    reason: str = ""


def differences(template: Template, a: dict[str, Any], b: dict[str, Any]) -> list[Difference]:
    out = []
    for key in CODE_FIELDS:
        da, db = a["distributions"][key], b["distributions"][key]
        if da == db:
            continue
        va, vb = a["typical"][key], b["typical"][key]
        d = Difference(key, va if len(da) == 1 else da, vb if len(db) == 1 else db)
        if key in template.expect:
            want = template.expect[key]
            ok_a, ok_b = set(da) == {str(want)}, set(db) == {str(want)}
            d.right = "A" if ok_a and not ok_b else "B" if ok_b and not ok_a else "neither"
            d.reason = template.why.get(key, f"PanDA's convention: {key} {want}")
        else:
            d.reason = "no PanDA convention decides this field for this template"
        out.append(d)
    if a["files"] != b["files"]:
        right = ""
        if template.expect.get("state") == "finished":
            # PanDA registers what the job names: every output, each with size and checksum
            outs = set(str(template.job.get("outFiles") or "").split(",")) - {""}
            ok_a = {f["lfn"] for f in a["files"]} == outs
            ok_b = {f["lfn"] for f in b["files"]} == outs
            right = "A" if ok_a and not ok_b else "B" if ok_b and not ok_a else ""
        out.append(Difference("files", a["files"], b["files"], right, "the job's outFiles"))
    if a["updates"] != b["updates"]:
        out.append(
            Difference(
                "updates", a["updates"], b["updates"], "", "PanDA requires only a final update"
            )
        )
    return out


def compare_template(
    template: Template, jobs: dict[str, list[JobOutcome]], side_names: dict[str, str]
) -> dict[str, Any]:
    summaries = {s: summarise(template, jobs[s]) for s in SIDES}
    diffs = differences(template, summaries["A"], summaries["B"])
    return {
        "template": template.name,
        "suites": list(template.suites),
        "expect": template.expect,
        "why": template.why,
        "agree": not any(d.field in CODE_FIELDS or d.field == "files" for d in diffs),
        "differences": [asdict(d) for d in diffs],
        **{s: {**summaries[s], "jobs": [asdict(o) for o in jobs[s]]} for s in SIDES},
    }


# -- the table -------------------------------------------------------------------------------


def _cell(side: dict[str, Any]) -> str:
    t = side["typical"]
    final = (side["times"]["final_update"] or {}).get("median")
    when = f" {final:.0f}s" if final is not None else ""
    return (
        f"{t['state']}/{t['pilotErrorCode']} exe={t['exeErrorCode']} trf={t['transExitCode']}"
        f" {side['as_expected']}/{side['n']}{when}"
    )


def _expected(expect: dict[str, Any]) -> str:
    if not expect:
        return "-"
    s = f"{expect.get('state', '?')}/{expect.get('pilotErrorCode', '?')}"
    if "transExitCode" in expect:
        s += f" trf={expect['transExitCode']}"
    return s


def _judged(d: dict[str, Any], names: dict[str, str]) -> str:
    who = {"A": names["A"], "B": names["B"]}.get(d["right"], d["right"])
    if d["field"] in CODE_FIELDS:
        what = f"{d['field']} {d['a']} vs {d['b']}"
    else:
        what = d["field"]
    return f"{what}: {who} right" if who else f"{what}: undecided"


def render_table(report: dict[str, Any]) -> str:
    """The operator's table: one line per template, then what differed and why."""
    names = report["names"]
    header = ["template", "expected", names["A"], names["B"], "differences"]
    rows = []
    for r in report["templates"]:
        diffs = "; ".join(_judged(d, names) for d in r["differences"]) or "-"
        rows.append([r["template"], _expected(r["expect"]), _cell(r["A"]), _cell(r["B"]), diffs])
    widths = [max(len(str(x[i])) for x in [header, *rows]) for i in range(4)]
    lines = []
    for line in [header, *rows]:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(line[:4], widths)) + "  " + line[4])
    lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * 11)
    lines.append("")
    clock = (
        "the dispatcher's clock"
        if report.get("server", "embedded") == "embedded"
        else (f"as the server {report['server']} recorded them")
    )
    lines.append(
        "cells: state/pilotErrorCode exeErrorCode transExitCode, jobs as expected/N, median"
        f" seconds from hand-out to final update ({clock})"
    )
    for r in report["templates"]:
        lines.append("")
        lines.append(f"[{r['template']}]")
        for s in SIDES:
            side = r[s]
            lines.append(f"  {names[s]}: diag: {side['pilotErrorDiag'] or '-'}")
            if side["exeErrorDiag"]:
                lines.append(f"  {names[s]}: exeErrorDiag: {side['exeErrorDiag']}")
            files = ", ".join(
                f"{f['lfn']}" + ("" if f.get("log") else f" {f['fsize']} B adler32 {f['adler32']}")
                for f in side["files"]
            )
            lines.append(f"  {names[s]}: files: {files or '-'}")
            lines.append(f"  {names[s]}: updates: {' > '.join(side['updates']) or '-'}")
            t = side["times"]
            parts = [
                f"{k} {v['median']}s"
                + (f" ({v['min']}-{v['max']})" if v["min"] != v["max"] else "")
                for k, v in t.items()
                if v
            ]
            lines.append(f"  {names[s]}: times: {', '.join(parts) or '-'}")
            dist = {k: v for k, v in side["distributions"].items() if len(v) > 1}
            if dist:
                lines.append(f"  {names[s]}: spread over {side['n']} jobs: {dist}")
        for d in r["differences"]:
            lines.append(f"  DIFFERS {_judged(d, names)} ({d['reason']})")
    agree = sum(r["agree"] for r in report["templates"])
    lines.append("")
    took = report.get("elapsed", 0.0)
    lines.append(
        f"{agree}/{len(report['templates'])} templates agree; {report['jobs_per_template']} jobs"
        f" per template; both pilots at once, {took:.0f} s in all"
    )
    return "\n".join(lines)
