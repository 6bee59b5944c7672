"""CPU cost of the payload monitor, per sample and per hour at the default interval.

Runs a real payload tree (a shell with sleeping children and a Python
process holding 100 MB) and measures, with the pilot's own CPU clock
(``time.process_time``):

- baseline: one bare ``psutil.Process.memory_info()`` call on one process;
- ``Sampler.sample()`` of the whole tree (memory incl. PSS, CPU, I/O, threads);
- a full ``JobMonitor.check()`` (sample + sockets + tracer log + stdout size,
  and the work-directory walk every ``disk_interval``);
- connection detection alone, as it runs every ``CONNECTION_INTERVAL``: the
  tree listed, its sockets read, the tracer log read; as a share of a core;
- the Python tracer in the payload: CPU of 2000 ``connect()`` calls to a
  local listener by a child with and without the tracer switched on;
- the orphan scan that runs once at every payload's end
  (``PayloadProcess.tagged_processes``: each process's ``/proc/<pid>/environ``
  searched as bytes for the payload's tag), against asking psutil for every
  process's environment.

Usage: ``python benchmarks/bench_monitor.py [--samples N] [--children K]``
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from pilot.monitor.limits import Limits
from pilot.monitor.pytracer import tracer_env
from pilot.monitor.sampler import Sampler
from pilot.monitor.watch import CONNECTION_INTERVAL, DEFAULT_INTERVAL, JobMonitor
from pilot.payload.runner import TAG_VARIABLE, PayloadProcess


def cpu_per_call(fn, n: int) -> float:  # noqa: ANN001 - any callable
    start = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - start) / n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--children", type=int, default=4)
    ap.add_argument("--files", type=int, default=500, help="files in the work directory")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-monitor-") as tmp:
        work = Path(tmp)
        for i in range(args.files):
            (work / f"f{i:05d}").write_bytes(b"x" * 1024)
        holder = "import time; x = b'\\x01' * (100 * 1024 * 1024); time.sleep(600)"
        script = " & ".join(["sleep 600"] * args.children + [f'"{sys.executable}" -c "{holder}"'])
        payload = PayloadProcess(
            f"{script} & wait", cwd=work, shell=True, stdout=work / "payload.stdout"
        )
        try:
            for _ in range(50):  # until the tree is complete (bounded)
                if len(payload.processes()) >= args.children + 2:
                    break
                time.sleep(0.1)
            procs = payload.processes()
            one = psutil.Process(payload.pid)

            base = cpu_per_call(one.memory_info, args.samples * 5)
            full_one = cpu_per_call(one.memory_full_info, args.samples)
            sampler = Sampler(payload, work / "series.txt")
            per_sample = cpu_per_call(sampler.sample, args.samples)

            monitor = JobMonitor(payload, work, Limits(looping_s=10**6), interval=DEFAULT_INTERVAL)
            t = [monitor.started]

            def check() -> None:
                t[0] += DEFAULT_INTERVAL
                assert monitor.check(now=t[0]) is None

            per_check = cpu_per_call(check, args.samples)

            c = [t[0]]  # after the checks above, whose clock ran ahead

            def look() -> None:  # only the connection look is due each time
                c[0] += CONNECTION_INTERVAL
                monitor._next_sample = monitor._next_disk = c[0] + 10**9
                monitor.check(now=c[0])

            per_look = cpu_per_call(look, args.samples)
            traced, bare = tracer_cost(work)
            scan = cpu_per_call(payload.tagged_processes, 20)
            scan_every = cpu_per_call(lambda: _environ_of_every_process(payload.tag), 20)
            n_node = len(psutil.pids())
        finally:
            payload.kill_tree(2.0)

    per_hour_samples = 3600 / DEFAULT_INTERVAL
    print(f"payload tree: {len(procs)} processes, work directory: {args.files} files")
    print(f"baseline psutil memory_info() on 1 process : {base * 1e6:8.1f} us")
    print(f"psutil memory_full_info() on 1 process     : {full_one * 1e6:8.1f} us")
    print(
        f"Sampler.sample() of the tree               : {per_sample * 1e3:8.3f} ms "
        f"({per_sample / base:.0f}x baseline, {per_sample / len(procs) * 1e6:.0f} us/process)"
    )
    print(f"JobMonitor.check() incl. sockets and disk   : {per_check * 1e3:8.3f} ms")
    hour = per_check * per_hour_samples
    print(
        f"at the default interval ({DEFAULT_INTERVAL:g} s): {hour:.3f} CPU s per hour = "
        f"{hour / 3600 * 100:.5f} % of a core"
    )
    print(
        f"connection detection, one look (tree, sockets, tracer log): {per_look * 1e3:8.3f} ms; "
        f"every {CONNECTION_INTERVAL:g} s: {per_look / CONNECTION_INTERVAL * 100:.3f} % of a core "
        f"(the rest of the monitor at its interval: {per_check / DEFAULT_INTERVAL * 100:.4f} %)"
    )
    print(
        f"Python tracer in the payload: {(traced - bare) / 2000 * 1e6:8.1f} us CPU per connect() "
        f"(medians of 5: {traced:.3f} s with, {bare:.3f} s without, 2000 connects each)"
    )
    print(
        f"orphan scan at a payload's end ({n_node} processes on the node): {scan * 1e3:8.3f} ms"
        f" CPU; psutil's environ() of every process: {scan_every * 1e3:.3f} ms"
    )
    return 0


def _environ_of_every_process(tag: str) -> list[int]:
    """The baseline of the orphan scan: psutil's environ() of every process."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get(TAG_VARIABLE) == tag:
                found.append(p.pid)
        except (psutil.Error, OSError):
            continue
    return found


CONNECTS = """
import socket, sys
for _ in range(2000):
    s = socket.create_connection(("127.0.0.1", int(sys.argv[1]))); s.close()
"""


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def tracer_cost(work: Path, rounds: int = 5) -> tuple[float, float]:
    """Median child CPU seconds for 2000 connects, with the tracer on and off, rounds
    alternated so that the machine's drift falls on both alike."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4096)
    server.settimeout(0.01)
    port = str(server.getsockname()[1])
    on: list[float] = []
    off: list[float] = []
    try:
        for _ in range(rounds):
            for env, out in ((tracer_env(work), on), (dict(os.environ), off)):
                before = _children_cpu()
                subprocess.run([sys.executable, "-c", CONNECTS, port], env=env, check=True)
                out.append(_children_cpu() - before)
                for _ in range(2100):  # empty the backlog between runs
                    try:
                        server.accept()[0].close()
                    except OSError:
                        break
    finally:
        server.close()
    return statistics.median(on), statistics.median(off)


if __name__ == "__main__":
    sys.exit(main())
