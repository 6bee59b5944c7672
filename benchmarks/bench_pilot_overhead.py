"""The pilot's own overhead on one trivial job, start to final update.

Runs `pilot run --url ... --max-jobs 1` against the embedded dispatcher on
127.0.0.1 for a job whose payload does nothing (`true`), and for one whose
payload fails at once (exit 7), and prints wall time and CPU (user+system of
the pilot and everything it started). Baselines from the same run: a bare
Python interpreter start, and the same payload started bare. Targets from
the issue: under 5 s wall and 0.5 s CPU for the trivial job (the PanDA pilot
3.7 takes about 22 s for a trivial job that finishes and about 140 s for one
that fails at once).

    python benchmarks/bench_pilot_overhead.py [--repeat N]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pilot.server.serve import EmbeddedServer


def _timed(argv: list[str], cwd: str | None = None) -> tuple[float, float, int]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(
        argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, proc.returncode


def _job(pars: str, transformation: str = "/bin/sh") -> dict:
    return {"transformation": transformation, "jobPars": pars, "coreCount": "1", "computingSite": "BENCH",
            "logFile": "bench.log.tgz", "scopeLog": "bench"}  # fmt: skip


def run_pilot(job: dict, base: Path) -> tuple[float, float, str]:
    with EmbeddedServer(base / "panda.db") as server:
        (panda_id,) = server.load_jobs([job])
        wall, cpu, _ = _timed(
            [sys.executable, "-m", "pilot.cli", "run", "--url", server.url, "--queue", "BENCH",
             "--max-jobs", "1", "--workdir", str(base / "work"),
             "--token-file", str(server.token_file)]
        )  # fmt: skip
        (record,) = server.final_records(panda_id)
    return wall, cpu, f"{record['fields']['state']}/{record['fields']['pilotErrorCode']}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        py = [_timed([sys.executable, "-c", "pass"]) for _ in range(args.repeat)]
        bare = [_timed(["/bin/sh", "-c", "true"]) for _ in range(args.repeat)]
        rows.append(("baseline: python -c pass", py, ""))
        rows.append(("baseline: payload bare (sh -c true)", bare, ""))
        for name, job in (
            ("pilot: trivial job", _job("-c true")),
            ("pilot: job failing at once", _job("-c 'exit 7'")),
        ):
            runs, outcome = [], ""
            for i in range(args.repeat):
                base = Path(tmp) / f"{name[7:12]}{i}"
                base.mkdir()
                wall, cpu, outcome = run_pilot(job, base)
                runs.append((wall, cpu, 0))
            rows.append((name, runs, outcome))
    print(f"{'what':40} {'wall s (median)':>16} {'CPU s (median)':>15}  outcome")
    for name, runs, outcome in rows:
        wall = statistics.median(r[0] for r in runs)
        cpu = statistics.median(r[1] for r in runs)
        print(f"{name:40} {wall:16.3f} {cpu:15.3f}  {outcome}")
    print(
        f"(medians of {args.repeat} runs; {os.cpu_count()} cores; targets: < 5 s wall, < 0.5 s CPU)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
