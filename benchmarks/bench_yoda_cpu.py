"""CPU used by Yoda and by a Droid while the payloads run (target: < 1% of a core each).

``mpiexec -n 3 pilot hpc`` (Yoda + 2 Droids, one slot each) runs toysim
ranges that each take about ``--range-cpu`` seconds of CPU, against the
embedded dispatcher in this process. Once the payloads are busy, the CPU
time of every rank process (not of its payload) is measured over a window.
Baseline from the same run and window: the CPU used by the payloads.

    python benchmarks/bench_yoda_cpu.py [--window 15]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from pilot.demo import mpiexec_argv
from pilot.server.serve import EmbeddedServer


def cpu(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


def find_ranks(proc: subprocess.Popen, size: int, timeout: float = 60) -> dict[int, psutil.Process]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = {}
        for c in psutil.Process(proc.pid).children(recursive=True):
            try:
                rank = c.environ().get("OMPI_COMM_WORLD_RANK")
                if rank is not None and "pilot.ranks" in " ".join(c.cmdline()):
                    found[int(rank)] = c
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        if len(found) == size:
            return found
        time.sleep(0.5)
    raise TimeoutError("ranks did not start")


def payloads(ranks: dict[int, psutil.Process]) -> list[psutil.Process]:
    out = []
    for r in ranks.values():
        try:
            out += [c for c in r.children(recursive=True) if "toysim" in " ".join(c.cmdline())]
        except psutil.NoSuchProcess:
            continue
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--window", type=float, default=15.0)
    p.add_argument("--range-cpu", type=float, default=2.0, help="CPU seconds per range")
    args = p.parse_args()
    n_droids = 2
    n_ranges = int(n_droids * (args.window + 20) / args.range_cpu) + 4
    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedServer(Path(tmp) / "server.db").start()
        try:
            server.load_task(
                {
                    "nJobs": 1,
                    "nRanges": n_ranges,
                    "nEventsPerRange": 4,
                    "job": {
                        "transformation": sys.executable,
                        "jobPars": f"-m pilot.payloads.toysim --cpu-per-event {args.range_cpu / 4}",
                        "computingSite": "CPUQ",
                        "coreCount": 1,
                    },
                }
            )
            work = Path(tmp) / "work"
            argv = [
                *mpiexec_argv(n_droids + 1),
                sys.executable,
                "-m",
                "pilot.ranks",
                "--url",
                server.url,
                "--token-file",
                str(server.token_file),
                "--queue",
                "CPUQ",
                "--workdir",
                str(work),
            ]
            proc = subprocess.Popen(
                argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
            )
            try:
                ranks = find_ranks(proc, n_droids + 1)
                deadline = time.monotonic() + 60
                while len(payloads(ranks)) < n_droids and time.monotonic() < deadline:
                    time.sleep(0.5)
                time.sleep(3.0)  # past the start-up (imports, HELLO, first fetch)
                pays = payloads(ranks)
                link = [c for c in ranks[0].children() if "yoda.link" in " ".join(c.cmdline())]
                t0 = time.monotonic()
                c0 = {r: cpu(p) for r, p in ranks.items()}
                l0 = sum(cpu(p) for p in link)
                p0 = {p.pid: cpu(p) for p in pays}
                time.sleep(args.window)
                wall = time.monotonic() - t0
                c1 = {r: cpu(p) for r, p in ranks.items()}
                l1 = sum(cpu(p) for p in link)
                p1 = {}
                for p in pays:
                    try:
                        p1[p.pid] = cpu(p)
                    except psutil.NoSuchProcess:
                        pass
            finally:
                os.killpg(proc.pid, 9)
                proc.wait(10)
        finally:
            server.stop()
    for r in sorted(ranks):
        role = "Yoda " if r == 0 else "Droid"
        print(f"{role} rank {r}: {100 * (c1[r] - c0[r]) / wall:.2f}% of a core over {wall:.0f} s")
        if r == 0:
            print(f"  its upstream link process: {100 * (l1 - l0) / wall:.2f}% of a core")
    pay = [100 * (p1[pid] - p0[pid]) / wall for pid in p1]
    print(
        f"baseline, the payloads in the same window: {', '.join(f'{x:.0f}%' for x in pay)}"
        f" of a core (2 cores, oversubscribed by the ranks)"
    )


if __name__ == "__main__":
    main()
