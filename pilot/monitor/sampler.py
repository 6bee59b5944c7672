"""Resource sampler for the payload's whole process tree, prmon-compatible.

Each sample sums memory over the live processes of the tree and reports
cumulative CPU and I/O for the tree *including processes that already
exited*. A job's CPU is what PanDA bills (``cpuConsumptionTime``), and a
transform that runs many short sub-processes would look idle if only live
processes counted.

How exited processes are kept: for every process seen, the sampler records
its own CPU plus its reaped children's CPU (``cutime``/``cstime``) and its
I/O counters (Linux adds a reaped child's I/O to its parent's counters, the
same way as CPU). When a process disappears, its figures moved into its
parent's ``children`` counters if an ancestor in the tree reaped it; when no
recorded ancestor is alive (the payload root itself, or an escapee
re-parented to init) its last figures go into a ``dead`` accumulator. So
short-lived processes that lived entirely between two samples still count,
and nothing is counted twice. (Children auto-reaped under ``SIGCHLD=SIG_IGN``
are not accounted by the kernel and so are lost; that is rare in payloads.)

The time series uses prmon's column names and units (memory in kB, I/O in
bytes, CPU in seconds, tab-separated, ``Time`` in epoch seconds) so tools
that read prmon output read this too; the default file names are those the
PanDA pilot gives prmon (``memory_monitor_output.txt`` and
``memory_monitor_summary.json``).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import astuple, dataclass, fields
from pathlib import Path
from typing import Protocol

import psutil

from pilot.fileio import atomic_write_json

OUTPUT_NAME = "memory_monitor_output.txt"
SUMMARY_NAME = "memory_monitor_summary.json"
COLUMNS = (
    "Time",
    "pss",
    "rss",
    "swap",
    "vmem",
    "rchar",
    "wchar",
    "read_bytes",
    "write_bytes",
    "utime",
    "stime",
    "nprocs",
    "nthreads",
)
MEMORY_COLUMNS = ("pss", "rss", "swap", "vmem")
IO_COLUMNS = ("rchar", "wchar", "read_bytes", "write_bytes")


class ProcessSource(Protocol):
    """What the sampler needs of a payload: its live processes (PayloadProcess fits)."""

    def processes(self) -> list[psutil.Process]: ...


@dataclass(frozen=True)
class Sample:
    """One row of the time series (field names are prmon's columns)."""

    Time: int
    pss: int  # kB
    rss: int  # kB
    swap: int  # kB
    vmem: int  # kB
    rchar: int  # bytes, cumulative
    wchar: int
    read_bytes: int
    write_bytes: int
    utime: float  # s, cumulative
    stime: float
    nprocs: int
    nthreads: int

    @property
    def cpu(self) -> float:
        return self.utime + self.stime

    def row(self) -> str:
        return "\t".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in astuple(self))


@dataclass
class _Seen:
    """Last figures of one process (keyed by pid and start time: pids are reused)."""

    ppid: int
    user: float = 0.0
    system: float = 0.0
    io: tuple[int, int, int, int] = (0, 0, 0, 0)


_Key = tuple[int, float]


class Sampler:
    """Samples a process tree; keeps the last samples and the running max/avg."""

    def __init__(
        self,
        source: ProcessSource | Callable[[], Iterable[psutil.Process]],
        output: str | Path | None = None,
        *,
        keep: int = 20,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._procs: Callable[[], Iterable[psutil.Process]] = (
            source.processes if hasattr(source, "processes") else source  # type: ignore[assignment]
        )
        self.output = Path(output) if output else None
        self._clock = clock
        self.last: deque[Sample] = deque(maxlen=keep)
        self.count = 0
        self._seen: dict[_Key, _Seen] = {}
        self._dead_cpu = [0.0, 0.0]
        self._dead_io = [0, 0, 0, 0]
        self._max: dict[str, float] = {}
        self._sum: dict[str, float] = {}
        self._first_time: int | None = None
        if self.output is not None:
            self.output.parent.mkdir(parents=True, exist_ok=True)
            if not self.output.exists() or self.output.stat().st_size == 0:
                self.output.write_text("\t".join(COLUMNS) + "\n", encoding="ascii")

    @property
    def latest(self) -> Sample | None:
        return self.last[-1] if self.last else None

    def sample(self, now: float | None = None) -> Sample:
        """Take one sample of the tree, append it to the file, and return it."""
        now = self._clock() if now is None else now
        mem = [0, 0, 0, 0]  # pss rss swap vmem, bytes
        nthreads = 0
        nprocs = 0
        live: dict[_Key, _Seen] = {}
        for proc in self._procs():
            try:
                with proc.oneshot():
                    key = (proc.pid, proc.create_time())
                    if proc.status() == psutil.STATUS_ZOMBIE:
                        # Its figures are final and still readable until it is reaped.
                        seen = self._seen.get(key)
                        if seen is not None:
                            live[key] = seen
                        continue
                    info = proc.memory_info()
                    try:
                        full = proc.memory_full_info()
                        pss, swap = full.pss, full.swap
                    except psutil.AccessDenied:
                        # PSS needs smaps, which another user's process (a
                        # setuid helper) hides: count its RSS instead.
                        pss, swap = info.rss, 0
                    cpu = proc.cpu_times()
                    try:
                        io = proc.io_counters()
                        io_t = (io.read_chars, io.write_chars, io.read_bytes, io.write_bytes)
                    except (psutil.AccessDenied, AttributeError):
                        io_t = self._seen[key].io if key in self._seen else (0, 0, 0, 0)
                    threads = proc.num_threads()
                    ppid = proc.ppid()
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                continue
            except psutil.AccessDenied:
                continue
            mem[0] += pss
            mem[1] += info.rss
            mem[2] += swap
            mem[3] += info.vms
            nthreads += threads
            nprocs += 1
            live[key] = _Seen(
                ppid=ppid,
                user=cpu.user + cpu.children_user,
                system=cpu.system + cpu.children_system,
                io=io_t,
            )
        self._retire(live)
        self._seen.update(live)
        user = self._dead_cpu[0] + sum(s.user for s in live.values())
        system = self._dead_cpu[1] + sum(s.system for s in live.values())
        io_tot = [self._dead_io[i] + sum(s.io[i] for s in live.values()) for i in range(4)]
        prev = self.latest
        if prev is not None:
            # Never let a cumulative counter go backwards (a process read mid-exit).
            user, system = max(user, prev.utime), max(system, prev.stime)
            io_tot = [
                max(a, b)
                for a, b in zip(io_tot, (prev.rchar, prev.wchar, prev.read_bytes, prev.write_bytes))
            ]
        s = Sample(
            Time=int(now),
            pss=mem[0] // 1024,
            rss=mem[1] // 1024,
            swap=mem[2] // 1024,
            vmem=mem[3] // 1024,
            rchar=io_tot[0],
            wchar=io_tot[1],
            read_bytes=io_tot[2],
            write_bytes=io_tot[3],
            utime=round(user, 2),
            stime=round(system, 2),
            nprocs=nprocs,
            nthreads=nthreads,
        )
        self._record(s)
        return s

    def _retire(self, live: dict[_Key, _Seen]) -> None:
        """Move the figures of vanished processes to the dead accumulator unless reaped in-tree."""
        gone = [k for k in self._seen if k not in live]
        if not gone:
            return
        live_pids = {k[0] for k in live}
        by_pid = {k[0]: v for k, v in self._seen.items()}
        for key in gone:
            seen = self._seen.pop(key)
            if self._ancestor_alive(seen.ppid, live_pids, by_pid):
                continue  # its parent (or an ancestor) reaped it and now counts it
            self._dead_cpu[0] += seen.user
            self._dead_cpu[1] += seen.system
            for i in range(4):
                self._dead_io[i] += seen.io[i]

    @staticmethod
    def _ancestor_alive(ppid: int, live_pids: set[int], by_pid: dict[int, _Seen]) -> bool:
        for _ in range(64):  # bounded walk up the recorded tree
            if ppid in live_pids:
                return True
            parent = by_pid.get(ppid)
            if parent is None:
                return False
            ppid = parent.ppid
        return False

    def _record(self, s: Sample) -> None:
        self.count += 1
        self.last.append(s)
        if self._first_time is None:
            self._first_time = s.Time
        for name in MEMORY_COLUMNS + ("nprocs", "nthreads"):
            value = getattr(s, name)
            self._max[name] = max(self._max.get(name, 0), value)
            self._sum[name] = self._sum.get(name, 0) + value
        if self.output is not None:
            with open(self.output, "a", encoding="ascii") as fh:
                fh.write(s.row() + "\n")

    # -- summaries -------------------------------------------------------------
    def prmon_summary(self) -> dict[str, dict[str, float]]:
        """prmon's JSON summary layout: ``{"Max": {...}, "Avg": {...}}``."""
        s = self.latest
        if s is None:
            return {"Max": {}, "Avg": {}}
        n = max(self.count, 1)
        maxima: dict[str, float] = {k: int(self._max[k]) for k in self._max}
        for name in IO_COLUMNS + ("utime", "stime"):
            maxima[name] = getattr(s, name)
        avg = {k: round(self._sum[k] / n, 2) for k in MEMORY_COLUMNS + ("nprocs", "nthreads")}
        wall = max(s.Time - (self._first_time or s.Time), 1)
        for name in IO_COLUMNS:
            avg[name] = round(getattr(s, name) / wall, 2)  # prmon: average rate, bytes/s
        return {"Max": maxima, "Avg": avg}

    def summary(self) -> dict[str, int]:
        """updateJob fields: memory in kB, totals in bytes, ``cpuConsumptionTime`` in s."""
        s = self.latest
        if s is None:
            return {}
        n = max(self.count, 1)
        out = {
            "maxRSS": int(self._max["rss"]),
            "maxVMEM": int(self._max["vmem"]),
            "maxSWAP": int(self._max["swap"]),
            "maxPSS": int(self._max["pss"]),
            "avgRSS": int(self._sum["rss"] / n),
            "avgVMEM": int(self._sum["vmem"] / n),
            "avgSWAP": int(self._sum["swap"] / n),
            "avgPSS": int(self._sum["pss"] / n),
            "totRCHAR": s.rchar,
            "totWCHAR": s.wchar,
            "totRBYTES": s.read_bytes,
            "totWBYTES": s.write_bytes,
            "cpuConsumptionTime": int(round(s.cpu)),
        }
        return out

    def job_metrics(self) -> str:
        """A ``jobMetrics`` fragment (space-separated key=value) with what PanDA does not have a field for."""
        s = self.latest
        if s is None:
            return ""
        wall = max(s.Time - (self._first_time or s.Time), 1)
        parts = {
            "maxPSS": int(self._max["pss"]),
            "maxProcs": int(self._max["nprocs"]),
            "maxThreads": int(self._max["nthreads"]),
            "readbyterate": int(s.read_bytes / wall),
            "writebyterate": int(s.write_bytes / wall),
        }
        return " ".join(f"{k}={v}" for k, v in parts.items())

    def write_summary(self, path: str | Path | None = None) -> Path | None:
        """Write the prmon-style JSON summary next to the time series (or to ``path``)."""
        if path is None:
            if self.output is None:
                return None
            path = self.output.with_name(SUMMARY_NAME)
        atomic_write_json(path, self.prmon_summary(), indent=1)
        return Path(path)


def read_series(path: str | Path) -> list[Sample]:
    """Read a time series written by :class:`Sampler` (or prmon: extra columns are ignored)."""
    lines = Path(path).read_text(encoding="ascii", errors="replace").splitlines()
    if not lines:
        return []
    header = lines[0].split("\t")
    index = {name: header.index(name) for name in COLUMNS if name in header}
    out = []
    for line in lines[1:]:
        cols = line.split("\t")
        try:
            values = {}
            for f in fields(Sample):
                raw = cols[index[f.name]] if f.name in index else "0"
                values[f.name] = float(raw) if f.type in ("float", float) else int(float(raw))
            out.append(Sample(**values))
        except (ValueError, IndexError):
            continue  # a half-written last line
    return out
