"""Run the templates through one pilot at a time and set the two results side by side.

Each pilot gets a fresh embedded dispatcher loaded with the same templates,
so the two runs cannot disturb each other and the server's records are the
only evidence compared: what PanDA monitoring would show for each job. A
pilot is any command line; ``{url}``, ``{host}``, ``{port}``, ``{queue}``,
``{workdir}`` and ``{queuedata_url}`` are filled in, so the PanDA pilot or
an older version of this one can be pointed at the same jobs.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pilot.comm.pandaapi import epoch_of
from pilot.commission.templates import Template, load_templates
from pilot.errors import PilotError
from pilot.queue import QueueConfig, schedconfig_url
from pilot.server.serve import EmbeddedServer

THIS_PILOT = "{python} -m pilot.cli run --url {url} --queue {queue} --workdir {workdir}"


@dataclass
class Outcome:
    """What the dispatcher recorded for one template's job."""

    template: str
    panda_id: int
    state: str = "missing"  # no final update arrived
    pilot_error_code: int = 0
    exe_error_code: int = 0
    trans_exit_code: int = 0
    wall: float = 0.0
    diag: str = ""

    @property
    def key(self) -> tuple[str, int]:
        return self.state, self.pilot_error_code


def _int(value: Any) -> int:
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return 0


def outcome_from_record(template: str, panda_id: int, fields: dict[str, Any] | None) -> Outcome:
    if not fields:
        return Outcome(template, panda_id)
    try:
        wall = epoch_of(fields.get("endTime", 0)) - epoch_of(fields.get("startTime", 0))
    except (TypeError, ValueError):
        wall = 0.0
    return Outcome(
        template,
        panda_id,
        state=str(fields.get("state", "missing")),
        pilot_error_code=_int(fields.get("pilotErrorCode")),
        exe_error_code=_int(fields.get("exeErrorCode")),
        trans_exit_code=_int(fields.get("transExitCode")),
        wall=round(max(0.0, wall), 2),
        diag=str(fields.get("pilotErrorDiag", ""))[:120],
    )


def run_pilot(
    command: str,
    templates: list[Template],
    workdir: Path,
    *,
    queue: str = "COMMISSION",
    timeout: float = 900.0,
) -> tuple[list[Outcome], float]:
    """Serve ``templates`` on a fresh dispatcher, run ``command`` against it, read back the records."""
    workdir.mkdir(parents=True, exist_ok=True)
    with EmbeddedServer(workdir / "dispatcher.db") as server:
        assert server.store is not None
        server.store.put_queue(queue, QueueConfig.default(queue).to_dict())
        jobs = []
        for t in templates:
            job = dict(t.job)
            job.pop("PandaID", None)
            job.setdefault("computingSite", queue)
            jobs.append(job)
        ids = server.load_jobs(jobs)
        values = {
            "python": shlex.quote(sys.executable),
            "url": server.url,
            "host": server.host,
            "port": server.port,
            "queue": queue,
            "workdir": shlex.quote(str(workdir / "pilot")),
            "queuedata_url": schedconfig_url(server.url, queue),
            "token_file": shlex.quote(str(server.token_file)),
        }
        argv = command.format(**values)
        start = time.monotonic()
        with open(workdir / "pilot.out", "wb") as out:
            try:
                # the dispatcher's token, where PanDA pilots look for one
                env = {**os.environ, "OIDC_AUTH_TOKEN": str(server.token_file.resolve())}
                env.setdefault("OIDC_AUTH_ORIGIN", "atlas.pilot")
                subprocess.run(
                    argv,
                    shell=True,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    timeout=timeout,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                out.write(f"\ncommissioning: pilot timed out after {timeout} s\n".encode())
        elapsed = time.monotonic() - start
        outcomes = []
        for t, panda_id in zip(templates, ids):
            records = server.final_records(panda_id)
            outcomes.append(
                outcome_from_record(t.name, panda_id, records[-1]["fields"] if records else None)
            )
    return outcomes, elapsed


@dataclass
class Row:
    template: str
    expected: str
    a: Outcome
    b: Outcome

    @property
    def agree(self) -> bool:
        return self.a.key == self.b.key

    def as_expected(self, side: Outcome) -> bool | None:
        if not self.expected:
            return None
        return f"{side.state}/{side.pilot_error_code}" == self.expected


def compare(templates: list[Template], a: list[Outcome], b: list[Outcome]) -> list[Row]:
    rows = []
    for t, oa, ob in zip(templates, a, b):
        expected = (
            f"{t.expect_state}/{t.expect_code}"
            if t.expect_state and t.expect_code is not None
            else ""
        )
        rows.append(Row(t.name, expected, oa, ob))
    return rows


def render(
    rows: list[Row], names: tuple[str, str] = ("A", "B"), elapsed: tuple[float, float] = (0, 0)
) -> str:
    """The side-by-side table: template, expectation, each pilot's state/code and wall time."""

    def cell(o: Outcome, ok: bool | None) -> str:
        mark = "" if ok is None else (" ok" if ok else " !!")
        return f"{o.state}/{o.pilot_error_code} ({o.wall:.1f}s){mark}"

    header = ["template", "expected", names[0], names[1], "same"]
    body = [
        [
            r.template,
            r.expected or "-",
            cell(r.a, r.as_expected(r.a)),
            cell(r.b, r.as_expected(r.b)),
            "yes" if r.agree else "NO",
        ]
        for r in rows
    ]
    widths = [max(len(str(x[i])) for x in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)) for line in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    same = sum(r.agree for r in rows)
    lines.append("")
    lines.append(
        f"{same}/{len(rows)} templates agree; pilot {names[0]} took {elapsed[0]:.1f} s, pilot {names[1]} {elapsed[1]:.1f} s"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``pilot commission``: exit 0 when both pilots agree on every template."""
    parser = argparse.ArgumentParser(prog="pilot commission", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--pilot-a", default=THIS_PILOT, help="command of the first pilot (placeholders: {url} ...)"
    )
    parser.add_argument("--pilot-b", default=THIS_PILOT, help="command of the second pilot")
    parser.add_argument("--name-a", default="A")
    parser.add_argument("--name-b", default="B")
    parser.add_argument(
        "--templates", default=None, help="directory of template JSON files (default: shipped)"
    )
    parser.add_argument("--only", nargs="*", default=None, help="template names to run")
    parser.add_argument("--queue", default="COMMISSION")
    parser.add_argument("--workdir", default="commission-work")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds each pilot may take")
    parser.add_argument("--json", default=None, help="write the comparison here as JSON")
    args = parser.parse_args(argv)
    try:
        templates = load_templates(args.templates, args.only)
    except PilotError as exc:
        print(f"pilot commission: {exc.diag}", file=sys.stderr)
        return 2
    base = Path(args.workdir).resolve()
    a, ta = run_pilot(args.pilot_a, templates, base / "a", queue=args.queue, timeout=args.timeout)
    b, tb = run_pilot(args.pilot_b, templates, base / "b", queue=args.queue, timeout=args.timeout)
    rows = compare(templates, a, b)
    print(render(rows, (args.name_a, args.name_b), (ta, tb)))
    if args.json:
        Path(args.json).write_text(
            json.dumps([{"template": r.template, "expected": r.expected, "a": asdict(r.a), "b": asdict(r.b),
                         "agree": r.agree} for r in rows], indent=1),
            encoding="utf-8",
        )  # fmt: skip
    return 0 if all(r.agree for r in rows) else 1
