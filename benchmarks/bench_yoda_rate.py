"""Full range lifecycle rate through rank 0, against raw mpi4py round trips.

A range's life here is everything but the payload: fetched from the upstream
(an answer already in memory, decoded from JSON) by rank 0's link process,
validated and journaled, leased to a droid in a WORK message, "run" by a
zero-cost executor, returned in an UPDATE, journaled, ACKed, and reported
upstream as an updateEventRanges entry. The baseline, on the same ranks of
the same mpiexec setup: raw mpi4py round trips (each droid rank sends a
small message, rank 0 answers). Batching must make ranges/s at least match
round trips/s. Each run also prints the CPU time per range of rank 0, its
link and the droids: on a shared machine the steadier figure.

    python benchmarks/bench_yoda_rate.py            # 2 and 4 ranks, 3 rounds each
    python benchmarks/bench_yoda_rate.py --ranges 1000000 --repeat 5

Runs ``mpiexec`` on this script itself, as ``pilot demo`` does (oversubscribed, ULFM).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TASK, PANDA = 4242, 7_000_000_001
HIGH = 128  # ranges per slot a droid may hold: deep enough to hide the round trip
RESERVE = 8192  # ranges rank 0 keeps READY beyond that, read ahead from the upstream


class FreeUpstream:
    """An upstream that answers at once: each range's JSON is ready before the clock
    starts, and a getEventRanges answer is decoded as the PanDA client decodes it.
    Every update is accepted (the entries are built, not sent)."""

    def __init__(self, n: int) -> None:
        one = (
            b'{"eventRangeID": "%d-%d-1-%%d-1", "startEvent": %%d, "lastEvent": %%d,'
            b' "LFN": "EVNT.pool.root", "GUID": "G", "scope": "mc"}' % (TASK, PANDA)
        )
        encoded = [one % (i + 1, i, i) for i in range(n)]
        self.blob = b",".join(encoded)  # an answer is a slice of it, as read off a socket
        self.ends = np.cumsum([len(e) + 1 for e in encoded]).tolist()
        self.given = 0
        self.reported = 0

    def get_event_ranges(self, panda_id, jobset_id, task_id, n_ranges):
        from pilot.comm import rangejson

        lo = self.given
        self.given = min(len(self.ends), lo + n_ranges)
        if self.given == lo:
            return []
        a, b = (self.ends[lo - 1] if lo else 0), self.ends[self.given - 1] - 1
        return rangejson.loads(b"[" + self.blob[a:b] + b"]")  # as PandaClient decodes it

    def update_event_ranges(self, entries, version=0):
        self.reported += len(entries)
        return [True] * len(entries)


def pingpong(round_trips: int) -> None:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    comm.Barrier()
    if rank == 0:
        status = MPI.Status()
        t0 = time.perf_counter()
        for _ in range(round_trips * (size - 1)):
            msg = comm.recv(source=MPI.ANY_SOURCE, tag=1, status=status)
            comm.send(msg, dest=status.Get_source(), tag=2)
        elapsed = time.perf_counter() - t0
        print(json.dumps({"round_trips_per_s": round_trips * (size - 1) / elapsed}), flush=True)
    else:
        for i in range(round_trips):
            comm.send((3, i, 1, {"want": 8}), dest=0, tag=1)
            comm.recv(source=0, tag=2)


def _cpu_of(pid: int | None) -> float:
    """CPU seconds used so far by process ``pid`` (0 for none)."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _before(method, hook):
    """``method`` with ``hook`` called first."""

    def wrapped(*args, **kwargs):
        hook()
        return method(*args, **kwargs)

    return wrapped


def lifecycle(n_ranges: int, slots: int, workdir: str, link_kind: str) -> None:
    from droid.droid import Droid, DroidOptions
    from droid.nullexec import NullExecutor
    from hpc.transport import MPITransport
    from hpc.tuning import tune_gc
    from yoda.journal import Book, Journal
    from yoda.ledger import Ledger, State
    from yoda.link import InlineLink, ProcessLink
    from yoda.master import Yoda, YodaOptions
    from yoda.scheduler import Policy, Scheduler

    t = MPITransport()
    if t.rank == 0:
        if link_kind == "process":  # as pilot hpc runs it: the upstream in a child process
            spec = {"factory": "bench_yoda_rate:FreeUpstream", "kwargs": {"n": n_ranges}}
            link = ProcessLink({**spec, "path": [str(Path(__file__).parent)]})
        else:
            link = InlineLink(FreeUpstream(n_ranges))
    tune_gc()  # as pilot hpc does
    t.comm.Barrier()
    if t.rank == 0:
        book = Book(Ledger(t0=time.time()), Journal(Path(workdir) / "yoda.journal", group=True))
        book.epoch(1)
        book.add_job({"PandaID": PANDA, "taskID": TASK, "jobsetID": TASK, "transformation": "x"})
        sched = Scheduler(book, Policy(high_per_slot=HIGH, low_per_slot=HIGH / 2), epoch=1)
        opts = YodaOptions(update_batch=1000, update_max=10_000, fetch_max=5000, reserve=RESERVE)
        yoda = Yoda(t, None, sched, opts, link=link)
        link_pid = link._proc.pid if link_kind == "process" else None
        t0, c0, l0 = time.perf_counter(), time.process_time(), _cpu_of(link_pid)
        ends: list[float] = []  # the link's CPU when rank 0 closes it
        link.close = _before(link.close, lambda: ends.append(_cpu_of(link_pid)))
        rc = yoda.run(max_seconds=600)
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
        book.journal.close()
        assert rc == 0 and book.ledger.count(State.FINISHED) == n_ranges, book.ledger.counts
        assert yoda.reported == n_ranges
        link_cpu = ends[0] - l0
    else:

        def factory(job, wd, s, lease_s):
            return NullExecutor(job, wd, s)

        opts = DroidOptions(slots=slots, update_batch=2000, update_interval=0.02)
        c0 = time.process_time()
        Droid(t, Path(workdir) / f"droid{t.rank}", factory, opts).run()
        cpu = time.process_time() - c0
    cpus = t.comm.gather(cpu, root=0)
    if t.rank == 0:
        us = 1e6 / n_ranges
        print(
            json.dumps(
                {
                    "ranges_per_s": n_ranges / elapsed,
                    "elapsed": elapsed,
                    "cpu_us": cpu * us,
                    "link_cpu_us": link_cpu * us,
                    "droid_cpu_us": sum(cpus[1:]) * us,
                }
            )
        )
    t.close()


def launch(n: int, *args: str) -> dict:
    from pilot.demo import mpiexec_argv  # what pilot demo runs: oversubscribed, root, ULFM

    argv = [*mpiexec_argv(n), sys.executable, __file__, *args]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=900, check=True)
    for line in out.stdout.splitlines():
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"no result: {out.stdout[-500:]} {out.stderr[-500:]}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ranges", type=int, default=300_000)
    p.add_argument("--repeat", type=int, default=3, help="rounds of baseline and ours")
    p.add_argument("--slots", type=int, default=64, help="slots per droid (cores of a node)")
    p.add_argument("--round-trips", type=int, default=5_000)
    p.add_argument("--role", choices=("pingpong", "lifecycle"))
    p.add_argument("--workdir")
    p.add_argument(
        "--link",
        choices=("process", "inline"),
        default="process",
        help="upstream in a child process (as pilot hpc) or in rank 0",
    )
    args = p.parse_args()
    if args.role == "pingpong":
        pingpong(args.round_trips)
        return
    if args.role == "lifecycle":
        lifecycle(args.ranges, args.slots, args.workdir, args.link)
        return
    for n in (2, 4):
        # This machine's speed drifts from one second to the next: each round runs the
        # baseline and then ours, and the medians of the rounds are compared.
        rates: dict[str, list[float]] = {"baseline": [], "process": [], "inline": []}
        for r in range(args.repeat):
            base = launch(n, "--role", "pingpong", "--round-trips", str(args.round_trips))
            rates["baseline"].append(base["round_trips_per_s"])
            print(
                f"{n} ranks, round {r + 1}: baseline {base['round_trips_per_s']:,.0f}"
                " raw mpi4py round trips/s",
                flush=True,
            )
            for link in ("process", "inline"):
                with tempfile.TemporaryDirectory() as tmp:
                    got = launch(
                        n,
                        *("--role", "lifecycle", "--ranges", str(args.ranges)),
                        *("--slots", str(args.slots), "--workdir", tmp, "--link", link),
                    )
                rates[link].append(got["ranges_per_s"])
                ratio = got["ranges_per_s"] / base["round_trips_per_s"]
                print(
                    f"  upstream link {link:7s}: {got['ranges_per_s']:,.0f} ranges/s through"
                    f" rank 0 ({args.ranges:,} ranges, {args.slots} slots per droid, journal"
                    f" on), {ratio:.1f}x the baseline; CPU us/range: rank 0"
                    f" {got['cpu_us']:.2f}, link {got['link_cpu_us']:.2f},"
                    f" droids {got['droid_cpu_us']:.2f}",
                    flush=True,
                )
        base_med = statistics.median(rates["baseline"])
        print(f"{n} ranks, median of {args.repeat}: baseline {base_med:,.0f} round trips/s")
        for link in ("process", "inline"):
            med = statistics.median(rates[link])
            print(f"  upstream link {link:7s}: {med:,.0f} ranges/s, {med / base_med:.2f}x")


if __name__ == "__main__":
    main()
