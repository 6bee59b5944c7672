"""Pilot overhead per event range with a zero-cost payload.

Figures printed (all measured in this run):

* baseline: a raw pyzmq ROUTER/DEALER round trip, the transport AthenaMP's
  yampl uses (``ipc:///tmp/zmq_<channel>``): a bare ROUTER in this process
  hands a fixed range to a minimal DEALER client that answers at once with a
  done report and the next request; pilot-side CPU per round trip;
* the pilot's channel on the same client: :class:`RangeChannel` plus the
  range message built and checked for each range and the report parsed
  (``range_message``, ``parse_message``): what handing out and taking back
  one range costs the pilot beyond the bare socket;
* baseline: toysim's own work per range, run in this process;
* protocol mode: ranges/s through :class:`EventExecutor` with toysim at
  ``--cpu-per-event 0`` (one event per range), and the pilot's own CPU per
  range (messages, output move, adler32);
* the same under the job's guard rails (:class:`pilot.payload.guard.Guard`, the
  payload's tree sampled every second instead of the default 60 s): what the
  monitor, the looping clock and the orphan scan add per range;
* the single-node engine (Yoda and one Droid in one process, the journal
  fsynced before every upstream call) with an in-memory dispatcher, same
  payload: what the ledger, journal and scheduler add to the executor;
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

import zmq

from pilot.config import PilotConfig
from pilot.eventservice.executor import EventExecutor
from pilot.eventservice.messages import DoneMessage, ReadyMessage, parse_message, range_message
from pilot.eventservice.yampl import RangeChannel, unique_channel_name
from pilot.job import EventRange, Job
from pilot.onenode import OneNode, run_event_service
from pilot.payload.guard import Guard

ECHO_CLIENT = textwrap.dedent(
    """
    import json, sys, zmq
    s = zmq.Context().socket(zmq.DEALER); s.setsockopt(zmq.LINGER, 1000)
    s.connect("ipc:///tmp/zmq_" + sys.argv[1])
    s.send(b"Ready for events")
    while True:
        msg = s.recv()
        if msg == b"No more events":
            break
        rid = json.loads(msg)[0]["eventRangeID"]
        s.send(("/x,ID:%s,CPU:0,WALL:0" % rid).encode())
        s.send(b"Ready for events")
    """
)


def _echo(name: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", ECHO_CLIENT, name])


def baseline(n: int) -> tuple[float, float]:
    """Raw pyzmq ROUTER round trips per second and ROUTER-side CPU per round trip."""
    name = unique_channel_name("bench")
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    router.bind(f"ipc:///tmp/zmq_{name}")
    proc = _echo(name)
    fixed = b'[{"eventRangeID": "1-2-3-4-5", "startEvent": 1, "lastEvent": 1, "PFN": "/d/EVNT"}]'
    done = 0
    t0 = c0 = 0.0
    for _ in range(3 * n + 1000):
        if not router.poll(5000):
            break
        peer, msg = router.recv_multipart()
        if msg != b"Ready for events":
            continue  # the report needs no answer
        if done == 0:
            t0, c0 = time.perf_counter(), time.process_time()
        if done < n:
            router.send_multipart([peer, fixed])
            done += 1
        else:
            router.send_multipart([peer, b"No more events"])
            break
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    proc.wait(10)
    router.close(0)
    ctx.term()
    os.unlink(f"/tmp/zmq_{name}")
    return n / wall, cpu / n


def channel_rate(n: int) -> tuple[float, float]:
    """The same round trips through the pilot's channel and message code."""
    ranges = make_ranges(n)
    with RangeChannel(unique_channel_name("bench")) as ch:
        proc = _echo(ch.name)
        sent = reported = 0
        t0 = c0 = 0.0
        for _ in range(3 * n + 1000):
            for incoming in ch.receive(5.0):
                msg = parse_message(incoming.text or "")
                if isinstance(msg, DoneMessage):
                    reported += 1
                elif isinstance(msg, ReadyMessage):
                    if sent == 0:
                        t0, c0 = time.perf_counter(), time.process_time()
                    if sent < n:
                        ch.send(incoming.peer, range_message(ranges[sent], "/d/EVNT"))
                        sent += 1
                    else:
                        ch.send(incoming.peer, "No more events")
            if reported >= n and sent >= n:
                break
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        for _ in range(10):
            batch = ch.receive(0.2)
            if not batch and proc.poll() is not None:
                break
            for incoming in batch:
                if incoming.text == "Ready for events":
                    ch.send(incoming.peer, "No more events")
        proc.wait(10)
    assert reported == n, reported
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


def executor_rate(
    n: int, workdir: Path, pars: str = "", guard_interval: float | None = None
) -> tuple[float, float, int]:
    """With ``guard_interval`` the payload runs under the job's full guard rails, its
    tree sampled every ``guard_interval`` seconds (every Droid's and pilot run's path)."""
    job = make_job(pars)
    guard = None
    if guard_interval is not None:
        guard = Guard(job, workdir, PilotConfig(workdir=workdir, monitor_interval=guard_interval))
    ex = EventExecutor(job, workdir, guard=guard)
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
    s = run_event_service(
        make_job(""), workdir, d, OneNode(batch_size=100, n_ranges_per_request=100)
    )
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
        rate, cpu = baseline(n)
        print(
            f"baseline  raw pyzmq ROUTER/DEALER   {rate:9.0f} /s   pilot CPU {cpu * 1e6:7.1f} us each"
        )
        rate, cpu = channel_rate(n)
        print(
            f"channel   RangeChannel + messages   {rate:9.0f} /s   pilot CPU {cpu * 1e6:7.1f} us/range"
        )
        rate = payload_alone(n, tmp)
        print(f"baseline  toysim work alone         {rate:9.0f} ranges/s   (no pilot, no messages)")
        rate, cpu, got = executor_rate(n, tmp / "exec")
        assert got == n
        print(
            f"protocol  EventExecutor             {rate:9.0f} ranges/s   pilot CPU {cpu * 1e6:7.1f} us/range"
        )
        rate, cpu, got = executor_rate(n, tmp / "guarded", guard_interval=1.0)
        assert got == n
        print(
            f"protocol  + the job's guard (1 s)   {rate:9.0f} ranges/s   pilot CPU {cpu * 1e6:7.1f} us/range"
        )
        rate, cpu, _ = loop_rate(n, tmp / "loop")
        print(
            f"one node  + Yoda, Droid, journal    {rate:9.0f} ranges/s   pilot CPU {cpu * 1e6:7.1f} us/range"
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
