"""What the batch allocation gives this pilot: nodes, ranks, cores, end time.

Read once, at start, from the batch system's environment variables and, where
the environment is silent (the end time, mostly), from its tools. The result
is one frozen :class:`BatchResources`; Yoda drains on its ``end_time``.

Each scheduler has its own detector class that knows only its variables and
tools; :func:`detect_resources` asks them in turn and falls back to the plain
"local" view (one node, ``os.cpu_count()`` cores, no end time) when no batch
system is found. Detection takes the environment as a mapping and the tools
as a :data:`CommandRunner`, so every path is testable with an injected
environment and canned tool output. A tool that is missing, slow or prints
garbage costs a field (``end_time`` stays ``None``), never the pilot.

``ranks_per_node`` is what the allocation plans per node (Slurm tasks, PBS
``mpiprocs``, LSF slots), 1 when the scheduler does not say.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import socket
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from typing import Callable

from pilot.errors import ErrorCode, PilotError

# --------------------------------------------------------------------------
# running tools


@dataclass(frozen=True)
class CommandResult:
    """A finished tool: 127 = not found, 124 = timed out (the shell's codes)."""

    returncode: int
    stdout: str = ""
    stderr: str = ""

    @property
    def ok(self) -> bool:
        return self.returncode == 0


CommandRunner = Callable[[Sequence[str]], CommandResult]

TOOL_TIMEOUT = 20.0


def run_command(
    argv: Sequence[str], timeout: float = TOOL_TIMEOUT, input_text: str | None = None
) -> CommandResult:
    """Run a batch-system tool; never raises for a missing or hanging tool."""
    try:
        proc = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input_text,
            stdin=None if input_text is not None else subprocess.DEVNULL,
            check=False,
        )
    except FileNotFoundError as exc:
        return CommandResult(127, "", str(exc))
    except subprocess.TimeoutExpired:
        return CommandResult(124, "", f"{argv[0]}: timed out after {timeout:.0f}s")
    except OSError as exc:
        return CommandResult(126, "", str(exc))
    return CommandResult(proc.returncode, proc.stdout, proc.stderr)


# --------------------------------------------------------------------------
# the result


@dataclass(frozen=True)
class BatchResources:
    """One allocation as the pilot sees it; ``end_time`` is epoch seconds."""

    scheduler: str
    job_id: str | None
    nodes: tuple[str, ...]
    ranks_per_node: int
    cores_per_node: int
    end_time: float | None
    scratch_dir: str
    shared_dir: str

    @property
    def n_nodes(self) -> int:
        return len(self.nodes)

    @property
    def total_ranks(self) -> int:
        return self.n_nodes * self.ranks_per_node

    @property
    def total_cores(self) -> int:
        return self.n_nodes * self.cores_per_node

    def seconds_left(self, now: float | None = None) -> float | None:
        """Time to the allocation's end, ``None`` when it has no known end."""
        if self.end_time is None:
            return None
        return self.end_time - (time.time() if now is None else now)

    def to_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["nodes"] = list(self.nodes)
        return data


# --------------------------------------------------------------------------
# small parsers shared by the detectors

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_walltime(text: str | int | float) -> int:
    """A walltime in seconds, from Slurm's notation or a unit suffix.

    Slurm's forms are accepted because users type them: ``M``, ``M:S``,
    ``H:M:S``, ``D-H``, ``D-H:M``, ``D-H:M:S`` (a bare number is minutes, as
    for ``sbatch -t``); also ``90s``, ``30m``, ``2h``, ``1d``. Numbers (int or
    float) are seconds.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if text <= 0 or not math.isfinite(text):
            raise PilotError(ErrorCode.GENERALERROR, f"walltime must be positive: {text!r}")
        return int(math.ceil(text))
    value = str(text).strip().lower()
    seconds: int | None = None
    unit = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", value)
    if unit:
        seconds = int(math.ceil(float(unit.group(1)) * _UNITS[unit.group(2)]))
    else:
        days = 0
        match = re.fullmatch(r"(\d+)-(\d+(?::\d+){0,2})", value)
        if match:
            days = int(match.group(1))
            parts = [int(p) for p in match.group(2).split(":")]
            parts += [0] * (3 - len(parts))  # D-H, D-H:M, D-H:M:S
            seconds = days * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]
        elif re.fullmatch(r"\d+(?::\d+){0,2}", value):
            parts = [int(p) for p in value.split(":")]
            if len(parts) == 1:
                seconds = parts[0] * 60
            elif len(parts) == 2:
                seconds = parts[0] * 60 + parts[1]
            else:
                seconds = parts[0] * 3600 + parts[1] * 60 + parts[2]
    if seconds is None or seconds <= 0:
        raise PilotError(
            ErrorCode.GENERALERROR,
            f"bad walltime {text!r}: use minutes, H:M:S, D-H:M:S or 90s/30m/2h",
        )
    return seconds


def parse_hms(text: str) -> int | None:
    """PBS/LSF durations ``[[H:]M:]S`` (bare number = seconds); None if garbage."""
    value = text.strip()
    if not re.fullmatch(r"\d+(?::\d+){0,2}(?:\.\d+)?", value):
        return None
    total = 0
    for part in value.split(":"):
        total = total * 60 + int(float(part))
    return total


def expand_hostlist(text: str) -> tuple[str, ...]:
    """Expand Slurm/Flux compressed host lists: ``nid[001-003,7],login1``."""
    hosts: list[str] = []
    for item in _split_top_level(text.strip()):
        hosts.extend(_expand_one(item))
    return tuple(dict.fromkeys(h for h in hosts if h))


def _split_top_level(text: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        elif char == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [item.strip() for item in items if item.strip()]


def _expand_one(item: str) -> list[str]:
    match = re.search(r"\[([^\]]*)\]", item)
    if not match:
        return [item]
    head, tail = item[: match.start()], item[match.end() :]
    out: list[str] = []
    for rng in match.group(1).split(","):
        lo, _, hi = rng.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise PilotError(ErrorCode.GENERALERROR, f"bad host list range {rng!r} in {item!r}")
        width = len(lo)
        for number in range(int(lo), int(hi or lo) + 1):
            out.extend(_expand_one(f"{head}{number:0{width}d}{tail}"))
    return out


def _first_count(text: str | None) -> int | None:
    """First number of Slurm's ``2(x3),1`` per-node lists."""
    if not text:
        return None
    match = re.match(r"\s*(\d+)", text)
    return int(match.group(1)) if match else None


def _positive_int(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        value = int(str(text).strip())
    except ValueError:
        return None
    return value if value > 0 else None


def _local_epoch(text: str) -> float | None:
    """Slurm's ISO local time (``2026-11-25T11:53:53``) as epoch seconds."""
    value = text.strip()
    if not value or value.lower() in ("n/a", "unknown", "none", "(null)"):
        return None
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        return None


def _scratch(env: Mapping[str, str], *names: str) -> str:
    for name in (*names, "TMPDIR"):
        if env.get(name):
            return env[name]
    return "/tmp"


# --------------------------------------------------------------------------
# one detector per scheduler


class Detector(ABC):
    """Reads one batch system; ``applies`` is a cheap environment check."""

    name = "?"

    @abstractmethod
    def applies(self, env: Mapping[str, str]) -> bool: ...

    @abstractmethod
    def detect(self, env: Mapping[str, str], run: CommandRunner, now: float) -> BatchResources: ...


class SlurmDetector(Detector):
    name = "slurm"

    def applies(self, env: Mapping[str, str]) -> bool:
        return bool(env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID"))

    def detect(self, env: Mapping[str, str], run: CommandRunner, now: float) -> BatchResources:
        job_id = env.get("SLURM_JOB_ID") or env["SLURM_JOBID"]
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or ""
        nodes = expand_hostlist(nodelist) or (socket.gethostname(),)
        cores = (
            _positive_int(env.get("SLURM_CPUS_ON_NODE"))
            or _first_count(env.get("SLURM_JOB_CPUS_PER_NODE"))
            or os.cpu_count()
            or 1
        )
        ranks = _positive_int(env.get("SLURM_NTASKS_PER_NODE")) or _first_count(
            env.get("SLURM_TASKS_PER_NODE")
        )
        if ranks is None and _positive_int(env.get("SLURM_NTASKS")):
            ranks = max(1, int(env["SLURM_NTASKS"]) // len(nodes))
        return BatchResources(
            scheduler=self.name,
            job_id=job_id,
            nodes=nodes,
            ranks_per_node=ranks or 1,
            cores_per_node=cores,
            end_time=self._end_time(env, job_id, run),
            scratch_dir=_scratch(env, "SLURM_TMPDIR"),
            shared_dir=env.get("SLURM_SUBMIT_DIR") or env.get("PWD") or os.getcwd(),
        )

    @staticmethod
    def _end_time(env: Mapping[str, str], job_id: str, run: CommandRunner) -> float | None:
        # Newer Slurm exports the end; 22.05 (Debian 12) does not.
        if env.get("SLURM_JOB_END_TIME", "").strip().isdigit():
            return float(env["SLURM_JOB_END_TIME"])
        squeue = run(["squeue", "-h", "-j", job_id, "-o", "%e"])
        if squeue.ok:
            end = _local_epoch(squeue.stdout.strip().splitlines()[0] if squeue.stdout else "")
            if end is not None:
                return end
        scontrol = run(["scontrol", "show", "job", job_id])
        if scontrol.ok:
            match = re.search(r"\bEndTime=(\S+)", scontrol.stdout)
            if match:
                return _local_epoch(match.group(1))
        return None


class PbsDetector(Detector):
    """PBS Pro and Torque: the node file, then ``qstat -f`` for the walltime."""

    name = "pbs"

    def applies(self, env: Mapping[str, str]) -> bool:
        return bool(env.get("PBS_JOBID"))

    def detect(self, env: Mapping[str, str], run: CommandRunner, now: float) -> BatchResources:
        job_id = env["PBS_JOBID"]
        slots = self._node_file(env.get("PBS_NODEFILE"))
        nodes = tuple(dict.fromkeys(slots)) or (env.get("HOSTNAME") or socket.gethostname(),)
        per_node = min(slots.count(h) for h in nodes) if slots else None
        ranks = per_node or _positive_int(env.get("PBS_NUM_PPN")) or 1
        cores = (
            _positive_int(env.get("PBS_NUM_PPN"))
            or _positive_int(env.get("NCPUS"))
            or per_node
            or os.cpu_count()
            or 1
        )
        return BatchResources(
            scheduler=self.name,
            job_id=job_id,
            nodes=nodes,
            ranks_per_node=ranks,
            cores_per_node=cores,
            end_time=self._end_time(env, job_id, run, now),
            scratch_dir=_scratch(env, "PBS_TMPDIR"),
            shared_dir=env.get("PBS_O_WORKDIR") or env.get("PWD") or os.getcwd(),
        )

    @staticmethod
    def _node_file(path: str | None) -> list[str]:
        if not path:
            return []
        try:
            with open(path, encoding="utf-8") as handle:
                return [line.split()[0] for line in handle if line.strip()]
        except OSError:
            return []

    @staticmethod
    def _end_time(
        env: Mapping[str, str], job_id: str, run: CommandRunner, now: float
    ) -> float | None:
        qstat = run(["qstat", "-f", job_id])
        if qstat.ok:
            limit = re.search(r"Resource_List\.walltime\s*=\s*(\S+)", qstat.stdout)
            used = re.search(r"resources_used\.walltime\s*=\s*(\S+)", qstat.stdout)
            limit_s = parse_hms(limit.group(1)) if limit else None
            if limit_s is not None:
                used_s = (parse_hms(used.group(1)) if used else None) or 0
                return now + max(0, limit_s - used_s)
        # Torque exports the limit in seconds; detection runs at job start.
        walltime = parse_hms(env.get("PBS_WALLTIME", ""))
        return now + walltime if walltime else None


class LsfDetector(Detector):
    """LSF: hosts and slots from ``LSB_MCPU_HOSTS``, time left from ``bjobs``."""

    name = "lsf"

    def applies(self, env: Mapping[str, str]) -> bool:
        return bool(env.get("LSB_JOBID"))

    def detect(self, env: Mapping[str, str], run: CommandRunner, now: float) -> BatchResources:
        job_id = env["LSB_JOBID"]
        slots = self._slots(env)
        nodes = tuple(slots) or (socket.gethostname(),)
        per_node = max(slots.values()) if slots else None
        return BatchResources(
            scheduler=self.name,
            job_id=job_id,
            nodes=nodes,
            ranks_per_node=per_node or 1,
            cores_per_node=per_node or os.cpu_count() or 1,
            end_time=self._end_time(job_id, run, now),
            scratch_dir=_scratch(env, "LSF_TMPDIR"),
            shared_dir=env.get("LS_SUBCWD") or env.get("PWD") or os.getcwd(),
        )

    @staticmethod
    def _slots(env: Mapping[str, str]) -> dict[str, int]:
        slots: dict[str, int] = {}
        words = env.get("LSB_MCPU_HOSTS", "").split()
        if words and len(words) % 2 == 0 and all(w.isdigit() for w in words[1::2]):
            for host, count in zip(words[::2], words[1::2]):
                slots[host] = slots.get(host, 0) + int(count)
            return slots
        for host in env.get("LSB_HOSTS", "").split():
            slots[host] = slots.get(host, 0) + 1
        return slots

    @staticmethod
    def _end_time(job_id: str, run: CommandRunner, now: float) -> float | None:
        # time_left prints "H:MM L" (or H:MM:SS with -hms); "-" when unlimited.
        bjobs = run(["bjobs", "-noheader", "-hms", "-o", "time_left", job_id])
        if not bjobs.ok:  # LSF before 10.1.0.2 has no -hms
            bjobs = run(["bjobs", "-noheader", "-o", "time_left", job_id])
        if not bjobs.ok or not bjobs.stdout.strip():
            return None
        left = parse_hms(bjobs.stdout.split()[0])
        if left is None:
            return None
        if bjobs.stdout.split()[0].count(":") == 1:  # H:MM without -hms support
            left *= 60
        return now + left


class FluxDetector(Detector):
    """Flux: the enclosing instance's resources and ``flux job timeleft``."""

    name = "flux"

    def applies(self, env: Mapping[str, str]) -> bool:
        return bool(env.get("FLUX_JOB_ID"))

    def detect(self, env: Mapping[str, str], run: CommandRunner, now: float) -> BatchResources:
        nodes: tuple[str, ...] = ()
        cores: int | None = None
        listing = run(
            ["flux", "resource", "list", "-s", "all", "-no", "{nnodes} {ncores} {nodelist}"]
        )
        if listing.ok:
            fields = listing.stdout.split()
            if len(fields) >= 3 and fields[0].isdigit() and fields[1].isdigit():
                nodes = expand_hostlist(fields[2])
                cores = int(fields[1]) // max(1, int(fields[0]))
        return BatchResources(
            scheduler=self.name,
            job_id=env["FLUX_JOB_ID"],
            nodes=nodes or (socket.gethostname(),),
            ranks_per_node=1,
            cores_per_node=cores or os.cpu_count() or 1,
            end_time=self._end_time(env, run, now),
            scratch_dir=_scratch(env, "FLUX_JOB_TMPDIR"),
            shared_dir=env.get("PWD") or os.getcwd(),
        )

    @staticmethod
    def _end_time(env: Mapping[str, str], run: CommandRunner, now: float) -> float | None:
        left = run(["flux", "job", "timeleft"])
        if left.ok:
            value = left.stdout.strip().lower()
            if value in ("inf", "infinity"):
                return None
            try:
                return now + float(value)
            except ValueError:
                pass
        info = run(["flux", "job", "info", env["FLUX_JOB_ID"], "R"])
        if info.ok:
            try:
                expiration = json.loads(info.stdout)["execution"]["expiration"]
            except (ValueError, KeyError, TypeError):
                return None
            if isinstance(expiration, (int, float)) and expiration > 0:
                return float(expiration)
        return None


DETECTORS: tuple[Detector, ...] = (SlurmDetector(), PbsDetector(), LsfDetector(), FluxDetector())


def local_resources(env: Mapping[str, str]) -> BatchResources:
    """No batch system: this host alone, all its cores, no end."""
    return BatchResources(
        scheduler="local",
        job_id=None,
        nodes=(socket.gethostname(),),
        ranks_per_node=1,
        cores_per_node=os.cpu_count() or 1,
        end_time=None,
        scratch_dir=_scratch(env),
        shared_dir=env.get("PWD") or os.getcwd(),
    )


def detect_resources(
    env: Mapping[str, str] | None = None,
    run: CommandRunner | None = None,
    *,
    walltime: str | int | float | None = None,
    now: float | None = None,
) -> BatchResources:
    """Detect the allocation; ``walltime`` (from now) overrides its end time.

    The first scheduler whose variables are set wins (Slurm, PBS, LSF, Flux
    in that order: nested allocations are rare and the outermost tools are
    the ones a job's own variables point at).
    """
    env = os.environ if env is None else env
    run = run_command if run is None else run
    now = time.time() if now is None else now
    found = next((d for d in DETECTORS if d.applies(env)), None)
    resources = found.detect(env, run, now) if found else local_resources(env)
    if walltime is not None:
        resources = replace(resources, end_time=now + parse_walltime(walltime))
    return resources


def main(argv: list[str] | None = None) -> int:
    """``pilot hpc resources``: print what the allocation gives, as JSON."""
    parser = argparse.ArgumentParser(
        prog="pilot hpc resources", description="Show the batch allocation as the pilot sees it."
    )
    parser.add_argument("--walltime", help="override the end: now + this (30m, 1:00:00, ...)")
    parser.add_argument(
        "--end-time", action="store_true", help="print only the end time (epoch seconds)"
    )
    args = parser.parse_args(argv)
    try:
        resources = detect_resources(walltime=args.walltime)
    except PilotError as exc:
        print(f"pilot hpc resources: {exc.diag}", file=sys.stderr)
        return 2
    if args.end_time:
        if resources.end_time is None:
            print("pilot hpc resources: the allocation has no known end time", file=sys.stderr)
            return 1
        print(int(resources.end_time))
        return 0
    print(json.dumps(resources.to_dict(), indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
