"""Pilot overhead per event range with a zero-cost payload.

Figures printed (all measured in this run):

* baseline: toysim's own work per range, run in this process;
* baseline: the raw message round trip over a Unix socket with the same
  line framing, between this process and a minimal Python client that
  answers at once (the floor for any protocol-mode pilot);
* protocol mode: ranges/s through :class:`EventExecutor` with toysim at
  ``--cpu-per-event 0`` (one event per range), and the pilot's own CPU per
  range (message handling, output move, adler32);
* the single-node loop with an in-memory dispatcher and the on-disk spool
  (fsync per batch), same payload;
* per-range command mode (one process per range), for comparison.

Usage: ``python benchmarks/bench_eventservice.py [--ranges N]``
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from pilot.eventservice.channel import MessageChannel, socket_path_for
from pilot.eventservice.executor import EventExecutor
from pilot.eventservice.loop import run_event_service
from pilot.job import EventRange, Job

ECHO_CLIENT = textwrap.dedent(
    """
    import os, socket, sys
    s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
    f = s.makefile("rb")
    s.sendall(b"Ready for events\\n")
    for line in f:
        if line.strip() == b"No more events":
            break
        s.sendall(b"/x,ID:1-2-3-4-5,CPU:0,WALL:0\\nReady for events\\n")
    """
)


def baseline(n: int, tmp: Path) -> tuple[float, float]:
    """Round trips per second and pilot-side CPU per round trip."""
    ch = MessageChannel(socket_path_for(tmp, "bench.sock"))
    proc = subprocess.Popen([sys.executable, "-c", ECHO_CLIENT, str(ch.path)])
    done = 0
    t0 = c0 = 0.0
    finished = False
    for _ in range(10 * n + 1000):
        for msg in ch.receive(5.0):
            if msg != "Ready for events":
                continue  # the done line needs no answer
            if done == 0:
                t0, c0 = time.perf_counter(), time.process_time()
            if done < n:
                ch.send('[{"eventRangeID": "1-2-3-4-5", "startEvent": 1, "lastEvent": 1}]')
                done += 1
            else:
                ch.send("No more events")
                finished = True
        if finished:
            break
    proc.wait(10)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    ch.close()
    return n / wall, cpu / n


def payload_alone(n: int, tmp: Path) -> float:
    """Ranges/s of toysim's own work (simulate, write) in this process: the payload's floor."""
    from pilot.payloads import toysim

    out = tmp / "alone"
    out.mkdir()
    injected = toysim.Injected(toysim.parser().parse_args([]))
    t0 = time.perf_counter()
    for r in make_ranges(n):
        toysim.process_range(r.to_panda(), out, 0.0, injected)
    return n / (time.perf_counter() - t0)


def make_job(pars: str) -> Job:
    return Job.from_panda(
        {
            "PandaID": 7,
            "taskID": 3,
            "jobsetID": 2,
            "transformation": sys.executable,
            "jobPars": "-m pilot.payloads.toysim " + pars,
            "eventService": "True",
        }
    )


def make_ranges(n: int) -> list[EventRange]:
    return [EventRange(f"3-7-1-{i}-0", i, i, "EVNT.root", "guid-1") for i in range(n)]


def executor_rate(n: int, workdir: Path, pars: str = "") -> tuple[float, float, int]:
    ex = EventExecutor(make_job(pars), workdir)
    ex.start()
    ex.add_ranges(make_ranges(n))
    ex.no_more_ranges()
    t0, c0 = time.perf_counter(), time.process_time()
    got = 0
    for _ in range(100 * n + 100):
        got += len(ex.poll(1.0))
        if ex.finished or ex.error is not None:
            break
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return n / wall, cpu / n, got


class Dispatcher:
    def __init__(self, n: int) -> None:
        self.todo = [r.to_panda() for r in make_ranges(n)]
        self.updated = 0

    def get_event_ranges(self, panda_id, jobset_id, task_id, n_ranges):
        out, self.todo = self.todo[:n_ranges], self.todo[n_ranges:]
        return out

    def update_event_ranges(self, entries, version=0):
        self.updated += len(entries)
        return [True] * len(entries)


def loop_rate(n: int, workdir: Path) -> tuple[float, float, int]:
    d = Dispatcher(n)
    t0, c0 = time.perf_counter(), time.process_time()
    s = run_event_service(make_job(""), workdir, d, d, batch_size=100, n_ranges_per_request=100)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert s.n_finished == n == d.updated, (s.n_finished, d.updated)
    return n / wall, cpu / n, s.n_finished


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ranges", type=int, default=2000)
    p.add_argument("--command-ranges", type=int, default=50)
    args = p.parse_args(argv)
    n = args.ranges
    print(
        f"event-service overhead, {n} ranges of 1 event, zero-cost toysim, {os.cpu_count()} cores"
    )
    with tempfile.TemporaryDirectory(prefix="bench-es-") as tmp:
        tmp = Path(tmp)
        rate, cpu = baseline(n, tmp)
        print(
            f"baseline  raw socket round trip     {rate:9.0f} /s   pilot CPU {cpu * 1e6:7.1f} us each"
        )
        rate = payload_alone(n, tmp)
        print(f"baseline  toysim work alone         {rate:9.0f} ranges/s   (no pilot, no messages)")
        rate, cpu, got = executor_rate(n, tmp / "exec")
        assert got == n
        print(
            f"protocol  EventExecutor             {rate:9.0f} ranges/s   pilot CPU {cpu * 1e6:7.1f} us/range"
        )
        rate, cpu, _ = loop_rate(n, tmp / "loop")
        print(
            f"loop      + dispatcher + spool      {rate:9.0f} ranges/s   pilot CPU {cpu * 1e6:7.1f} us/range"
        )
        m = args.command_ranges
        pars = (
            "--start {startEvent} --last {lastEvent} --lfn {LFN} --guid {GUID}"
            " --output {outputFile} --range-id {eventRangeID}"
        )
        rate, cpu, got = executor_rate(m, tmp / "cmd", pars)
        assert got == m
        print(
            f"command   one process per range     {rate:9.1f} ranges/s   pilot CPU {cpu * 1e6:7.1f} us/range ({m} ranges)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
