"""``pilot demo``: the whole system on one machine, in one command.

It starts the embedded dispatcher on 127.0.0.1 (ephemeral port, SQLite in the
work directory), loads one event-service task of the toy payload
(``pilot.payloads.toysim``), and runs ``mpiexec -n N pilot hpc`` against it:
Yoda on rank 0, a Droid on every other rank. Where MPI is missing (no
``mpiexec`` or no ``mpi4py``) it says so and runs the single-node pilot
(``pilot run --url``) instead, which speaks the same protocol.

While the ranks work it shows the dispatcher's range counts (a progress bar
on a terminal, a line every few seconds otherwise); then it prints a summary
table, draws the timeline picture (``timeline.png``, see
:mod:`pilot.timeline`) and writes ``demo-report.json`` with the counts, the
rates, per-droid totals and the dispatcher's final job records.

The defaults (400 ranges of 2 events, 0.05 CPU s per event, 4 ranks) take
about 45 s on 2 cores: long enough for the picture to show the droids at
work, short enough for a first try.

Exit 0 when every range finished and none was reported twice; 1 otherwise
(and on a timeout); 2 on bad usage; 130 on Ctrl-C.

The subprocesses import the same ``pilot`` as this module (its directory is
put first on ``PYTHONPATH``), so the demo works from a source tree as well as
from an installation, and ``sys.executable -m pilot.cli`` needs no PATH.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from pilot.errors import ErrorCode, PilotError
from pilot.fileio import atomic_write_json
from pilot.payload.runner import PayloadProcess
from pilot.server.serve import EmbeddedServer
from pilot.timeline import (
    draw_timeline,
    results_from_dump,
    spans_from_dispatcher,
    spans_from_journal,
)

QUEUE = "DEMO"
TERMINAL = ("finished", "failed", "fatal")
PILOT_ROOT = str(Path(__file__).resolve().parent.parent)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pilot demo",
        description="Embedded dispatcher + a toy event-service task through Yoda and Droids.",
    )
    p.add_argument("--workdir", help="where everything goes (default: a new temporary directory)")
    p.add_argument("--ranges", type=int, default=2000, help="event ranges in the task")
    p.add_argument("--events-per-range", type=int, default=2)
    p.add_argument(
        "--cpu-per-event",
        type=float,
        default=0.01,
        metavar="S",
        help="extra CPU seconds the toy payload burns per event",
    )
    p.add_argument("--ranks", type=int, default=4, help="MPI ranks: Yoda + (N-1) droids")
    p.add_argument(
        "--mode",
        choices=("auto", "mpi", "single"),
        default="auto",
        help="auto: MPI when mpiexec and mpi4py are here, else the single-node pilot",
    )
    p.add_argument("--timeout", type=float, default=600.0, metavar="S", help="give up after this")
    p.add_argument("--poll", type=float, default=0.5, metavar="S", help="progress refresh")
    return p


# -- how to run --------------------------------------------------------------------


def mpi_unavailable() -> str | None:
    """Why MPI mode cannot run here, or None when it can."""
    if importlib.util.find_spec("mpi4py") is None:
        return "mpi4py is not installed"
    exe = shutil.which("mpiexec")
    if exe is None:
        return "no mpiexec on PATH"
    try:
        proc = subprocess.run(
            [exe, "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"mpiexec does not run: {exc}"
    if proc.returncode != 0:
        return f"mpiexec --version failed: {(proc.stderr or proc.stdout).strip()[-200:]}"
    return None


def mpiexec_argv(ranks: int) -> list[str]:
    """``mpiexec -n N`` with what Open MPI needs on a small machine: more ranks than
    cores, root in containers, ULFM (5.x) so that a dead droid does not end the run."""
    exe = shutil.which("mpiexec") or "mpiexec"
    argv = [exe, "-n", str(ranks)]
    try:
        version = subprocess.run(
            [exe, "--version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        version = ""
    if "Open MPI" in version or "OpenRTE" in version:
        argv.append("--oversubscribe")
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            argv.append("--allow-run-as-root")
        words = version.split()
        major = next((w.split(".")[0] for w in words if w[:1].isdigit()), "0")
        if major.isdigit() and int(major) >= 5:
            argv += ["--with-ft", "ulfm"]
    return argv


def pilot_command(
    mode: str, url: str, workdir: Path, ranks: int, token_file: Path | None = None
) -> list[str]:
    """The pilot's command line; ``token_file`` is the dispatcher's bearer token."""
    me = [sys.executable, "-m", "pilot.cli"]
    auth = ["--token-file", str(token_file)] if token_file else []
    if mode == "mpi":
        return mpiexec_argv(ranks) + me + [
            "hpc", "--url", url, "--queue", QUEUE, "--workdir", str(workdir / "hpc"), *auth,
        ]  # fmt: skip
    return me + [
        "run", "--url", url, "--queue", QUEUE, "--workdir", str(workdir / "pilot"),
        "--max-jobs", "1", *auth,
    ]  # fmt: skip


# -- progress ------------------------------------------------------------------------


class Progress:
    """A bar redrawn in place on a terminal; a plain line every ``every`` s otherwise."""

    def __init__(self, total: int, out: IO[str], *, tty: bool, every: float = 5.0) -> None:
        self.total = max(1, total)
        self.out = out
        self.tty = tty
        self.every = every
        self._last_line = float("-inf")
        self._last_done = -1

    def show(self, counts: Counter, elapsed: float) -> None:
        done = sum(counts[s] for s in TERMINAL)
        rate = done / elapsed if elapsed > 0 else 0.0
        text = (
            f"{done}/{self.total} ranges  {rate:6.1f}/s  "
            f"failed {counts['failed'] + counts['fatal']}  {elapsed:5.1f} s"
        )
        if self.tty:
            width = 30
            filled = int(width * done / self.total)
            self.out.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {text} ")
            self.out.flush()
        elif elapsed - self._last_line >= self.every or (
            done >= self.total and done != self._last_done
        ):
            self._last_line = elapsed
            self._last_done = done
            self.out.write(f"progress: {text}\n")
            self.out.flush()

    def close(self) -> None:
        if self.tty:
            self.out.write("\n")
            self.out.flush()


# -- running -------------------------------------------------------------------------


@dataclass
class RunOutcome:
    returncode: int | None
    wall: float
    timed_out: bool = False
    interrupted: bool = False
    log_path: Path = field(default_factory=Path)


def run_pilot(
    argv: list[str], server: EmbeddedServer, workdir: Path, args: argparse.Namespace, total: int
) -> RunOutcome:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PILOT_ROOT, env.get("PYTHONPATH")) if p)
    log_path = workdir / "pilot.log"
    progress = Progress(total, sys.stdout, tty=sys.stdout.isatty())
    assert server.store is not None
    t0 = time.monotonic()
    # The launcher and its ranks run as a payload does: own session, whole tree
    # stopped on a timeout or Ctrl-C (TERM so the ranks drain, then KILL).
    proc = PayloadProcess(argv, cwd=workdir, env=env, stdout=log_path, stderr=log_path)
    outcome = RunOutcome(None, 0.0, log_path=log_path)
    try:
        while True:
            outcome.returncode = proc.wait(args.poll)
            elapsed = time.monotonic() - t0
            progress.show(Counter(server.store.range_counts()), elapsed)
            if outcome.returncode is not None:
                break
            if elapsed > args.timeout:
                outcome.timed_out = True
                proc.kill_tree(grace=30.0)
                outcome.returncode = proc.returncode
                break
    except KeyboardInterrupt:
        outcome.interrupted = True
        proc.kill_tree(grace=10.0)
        outcome.returncode = proc.returncode
    finally:
        progress.close()
    outcome.wall = time.monotonic() - t0
    return outcome


# -- results -------------------------------------------------------------------------


def read_journal_results(journal: Path) -> list:
    """Yoda's results, through ``pilot hpc journal --results`` (``pilot`` does not import ``yoda``)."""
    argv = [sys.executable, "-m", "pilot.cli", "hpc", "journal", "--results", str(journal)]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=True)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        raise PilotError(
            ErrorCode.FILEHANDLINGFAILURE, f"cannot read {journal}: {exc.stderr or exc}"
        ) from None
    return results_from_dump(out.stdout.splitlines())


def build_report(
    server: EmbeddedServer, workdir: Path, mode: str, args: argparse.Namespace, run: RunOutcome
) -> tuple[dict[str, Any], list]:
    """The report dict and the timeline's spans."""
    store = server.store
    assert store is not None
    ranges = store.ranges()
    counts = Counter(r["status"] for r in ranges)
    twice = sorted(rid for rid, n in store.range_update_counts().items() if n > 1)
    updated_at = {r["range_id"]: r["modified"] for r in ranges if r["modified"] is not None}
    journal = workdir / "hpc" / "yoda.journal"
    per_droid: dict[str, dict[str, float]] = {}
    if mode == "mpi" and journal.is_file():
        results = read_journal_results(journal)
        spans = spans_from_journal(results, updated_at)
        for r in results:
            d = per_droid.setdefault(
                f"droid {r.droid}",
                {"finished": 0, "failed": 0, "fatal": 0, "cpu_s": 0.0, "payload_wall_s": 0.0},
            )
            d[r.status] = d.get(r.status, 0) + 1
            d["cpu_s"] += r.cpu
            d["payload_wall_s"] += r.wall
        cpu = sum(r.cpu for r in results)
    else:
        spans = spans_from_dispatcher(ranges, "node")
        cpu = sum(float(r["cpu"] or 0.0) for r in ranges if r["status"] in TERMINAL)
        if spans:
            per_droid["node"] = {s: counts[s] for s in TERMINAL}
            per_droid["node"]["cpu_s"] = cpu
    done = sum(counts[s] for s in TERMINAL)
    droids = max(1, args.ranks - 1) if mode == "mpi" else 1
    cores = min(droids, os.cpu_count() or 1)
    wall = run.wall
    for d in per_droid.values():
        for key in ("cpu_s", "payload_wall_s"):
            if key in d:
                d[key] = round(d[key], 3)
    report = {
        "mode": mode,
        "ranks": args.ranks if mode == "mpi" else 1,
        "droids": droids,
        "cores": cores,
        "task": {
            "ranges": len(ranges),
            "events_per_range": args.events_per_range,
            "cpu_per_event_s": args.cpu_per_event,
            "queue": QUEUE,
        },
        "counts": {s: counts[s] for s in sorted(counts)},
        "reported_twice": twice,
        "wall_s": round(wall, 3),
        "ranges_per_s": round(done / wall, 3) if wall > 0 else 0.0,
        "payload_cpu_s": round(cpu, 3),
        "cpu_efficiency": round(cpu / (wall * cores), 4) if wall > 0 else 0.0,
        "per_droid": per_droid,
        "pilot_exit_code": run.returncode,
        "timed_out": run.timed_out,
        "final_records": store.final_records(),
        "paths": {"workdir": str(workdir), "pilot_log": str(run.log_path)},
    }
    return report, spans


def summary_table(report: dict[str, Any]) -> str:
    counts = report["counts"]
    rows = [
        ("ranges", str(report["task"]["ranges"])),
        ("finished", str(counts.get("finished", 0))),
        ("failed", str(counts.get("failed", 0))),
        ("fatal", str(counts.get("fatal", 0))),
        ("not done", str(sum(n for s, n in counts.items() if s not in TERMINAL))),
        ("reported twice", str(len(report["reported_twice"]))),
        ("wall time", f"{report['wall_s']:.1f} s"),
        ("ranges/s", f"{report['ranges_per_s']:.1f}"),
        ("payload CPU", f"{report['payload_cpu_s']:.1f} s"),
        ("CPU efficiency", f"{100 * report['cpu_efficiency']:.1f} % of {report['cores']} cores"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = ["", "summary", "-" * (width + 16)]
    lines += [f"{k:<{width}}  {v:>12}" for k, v in rows]
    if report["per_droid"]:
        lines += ["", f"{'lane':<10} {'finished':>9} {'failed':>7} {'CPU s':>9}"]
        for lane, d in sorted(report["per_droid"].items(), key=lambda kv: _lane_order(kv[0])):
            failed = int(d.get("failed", 0) + d.get("fatal", 0))
            lines.append(f"{lane:<10} {int(d['finished']):>9} {failed:>7} {d['cpu_s']:>9.1f}")
    return "\n".join(lines)


def _lane_order(lane: str) -> tuple[int, str]:
    word = lane.rsplit(" ", 1)[-1]
    return (int(word), lane) if word.isdigit() else (1 << 30, lane)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.ranges < 1 or args.events_per_range < 1 or args.cpu_per_event < 0:
        print("pilot demo: --ranges and --events-per-range >= 1, --cpu-per-event >= 0")
        return 2
    if args.ranks < 2:
        print("pilot demo: --ranks needs at least 2 (Yoda and one droid)")
        return 2
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="pilot-demo-")).resolve()
    leftovers = [n for n in ("dispatcher.db", "hpc", "pilot") if (workdir / n).exists()]
    if leftovers:
        # an old dispatcher database or journal would mix two runs in one report
        print(f"pilot demo: {workdir} holds an earlier run ({', '.join(leftovers)}): use another")
        return 2
    workdir.mkdir(parents=True, exist_ok=True)
    mode = args.mode
    if mode != "single":
        why = mpi_unavailable()
        if why and mode == "mpi":
            print(f"pilot demo: MPI mode impossible: {why}")
            return 1
        if why:
            print(f"MPI not available ({why}): running the single-node pilot (pilot run --url)")
            mode = "single"
        else:
            mode = "mpi"
    server = EmbeddedServer(workdir / "dispatcher.db", host="127.0.0.1", port=0)
    server.start()
    try:
        task = server.load_task(
            {
                "nJobs": 1,
                "nRanges": args.ranges,
                "nEventsPerRange": args.events_per_range,
                "job": {
                    "transformation": sys.executable,
                    "jobPars": f"-m pilot.payloads.toysim --cpu-per-event {args.cpu_per_event}",
                    "computingSite": QUEUE,
                    "coreCount": 1,
                },
            }
        )
        argv_run = pilot_command(mode, server.url, workdir, args.ranks, server.token_file)
        print(f"dispatcher  {server.url}  (SQLite {workdir / 'dispatcher.db'})")
        print(
            f"task        {task['jediTaskID']}: {args.ranges} ranges x {args.events_per_range}"
            f" events of toysim, {args.cpu_per_event} CPU s/event"
        )
        if mode == "mpi":
            print(f"running     Yoda on rank 0 + {args.ranks - 1} droids: {' '.join(argv_run)}")
        else:
            print(f"running     single-node pilot: {' '.join(argv_run)}")
        sys.stdout.flush()
        run = run_pilot(argv_run, server, workdir, args, args.ranges)
        report, spans = build_report(server, workdir, mode, args, run)
    finally:
        server.stop()
    print(summary_table(report))
    picture = workdir / "timeline.png"
    try:
        draw_timeline(
            spans,
            picture,
            title=f"{len(spans)} event ranges, {report['ranges_per_s']:.1f} ranges/s"
            f" ({mode} mode, {report['droids']} droid{'s' if report['droids'] > 1 else ''})",
            t0=min((s.start for s in spans), default=None),
        )
        report["paths"]["timeline"] = str(picture)
    except PilotError as exc:
        print(f"no timeline picture: {exc.detail}")
    report_path = workdir / "demo-report.json"
    report["paths"]["report"] = str(report_path)
    atomic_write_json(report_path, report, indent=2)
    print()
    if "timeline" in report["paths"]:
        print(f"timeline    {picture}")
    print(f"report      {report_path}")
    print(f"pilot log   {run.log_path}")
    counts = report["counts"]
    ok = counts.get("finished", 0) == report["task"]["ranges"] and not report["reported_twice"]
    if run.interrupted:
        print("interrupted")
        return 130
    if run.timed_out:
        print(f"pilot demo: gave up after {args.timeout:.0f} s")
        return 1
    if not ok:
        print("pilot demo: not every range finished exactly once")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
