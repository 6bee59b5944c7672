"""Batch systems' own words: the request of an allocation and each scheduler's directives.

One :class:`BatchRequest` (checked when built) says what the job needs; a
:class:`Dialect` per scheduler turns it into ``#SBATCH``/``#PBS``/``#BSUB``/
``# flux:`` lines, the submit command and the job-id parsing. Adding a
batch system means adding a dialect here; the script body
(``hpc.batch``) is the same for all.
"""

from __future__ import annotations

import math
import os
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

from pilot.errors import ErrorCode, PilotError

SCHEDULERS = ("slurm", "pbs", "lsf", "flux")
LAUNCHERS = ("mpiexec", "srun", "flux")
FORWARDED_SIGNALS = ("TERM", "INT", "USR1", "USR2")


@dataclass(frozen=True)
class BatchRequest:
    """Everything a batch script depends on; validated on construction."""

    scheduler: str
    nodes: int
    walltime: int = 0  # seconds; 0: the batch system's default limit
    url: str | None = None
    queue: str | None = None  # the PanDA queue
    harvester: str | None = None  # the Harvester access point
    ranks_per_node: int = 1
    cores_per_rank: int = 1
    launcher: str | None = None  # None: the scheduler's default
    job_name: str = "panda-pilot"
    batch_queue: str | None = None  # the batch system's queue / partition
    account: str | None = None
    log_dir: str = "."
    workdir: str | None = None
    env: tuple[tuple[str, str], ...] = ()
    pilot_command: str = "pilot"
    path_prepend: str | None = None
    resume: bool = False
    slots: int = 0  # payload slots per droid; 0: one per core of the rank
    copytool: str = ""  # how droids store outputs (pilot hpc --copytool), "" its default
    output_url: str = ""  # where (pilot hpc --output-url)
    queuedata_url: str = ""  # the queue's description, its limits (pilot hpc --queuedata-url)
    token_file: str = ""  # the bearer token for --url (pilot hpc --token-file)
    panda_api: str = ""  # v1, legacy or auto (pilot hpc --panda-api), "" its default
    oversubscribe: bool = False
    ulfm: bool = False
    allow_run_as_root: bool = False
    pbs_flavor: str = "pro"
    extra_directives: tuple[str, ...] = ()
    launcher_args: tuple[str, ...] = ()
    harvester_values: tuple[tuple[str, str], ...] = field(default=())

    def __post_init__(self) -> None:
        problems = []
        if self.scheduler not in SCHEDULERS:
            problems.append(
                f"unknown scheduler {self.scheduler!r} (one of {', '.join(SCHEDULERS)})"
            )
        for name in ("nodes", "ranks_per_node", "cores_per_rank"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1")
        if self.walltime < 0:
            problems.append("walltime must not be negative")
        if self.slots < 0:
            problems.append("slots must be at least 1")
        if bool(self.url) == bool(self.harvester):
            problems.append("give exactly one upstream: --url URL --queue Q, or --harvester DIR")
        if self.url and not self.queue:
            problems.append("--url needs --queue (the PanDA queue)")
        if self.harvester and (self.token_file or self.panda_api):
            problems.append("--token-file and --panda-api go with --url, not --harvester")
        if self.token_file and not os.path.isfile(self.token_file):
            problems.append(f"--token-file {self.token_file}: no such file")
        if self.launcher_name not in LAUNCHERS:
            problems.append(f"unknown launcher {self.launcher!r} (one of {', '.join(LAUNCHERS)})")
        elif self.launcher_name == "srun" and self.scheduler != "slurm":
            problems.append("--launcher srun needs --scheduler slurm")
        elif self.launcher_name == "flux" and self.scheduler != "flux":
            problems.append("--launcher flux needs --scheduler flux")
        elif self.launcher_name == "flux" and self.total_ranks < 2:
            problems.append(
                "flux run starts exactly the ranks asked for and pilot hpc needs two"
                " (Yoda and a droid): --ranks-per-node 2 or more nodes"
            )
        if self.pbs_flavor not in ("pro", "torque"):
            problems.append("--pbs-flavor is pro or torque")
        for key, _ in self.env:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
                problems.append(f"bad environment variable name {key!r}")
        if not re.fullmatch(r"[A-Za-z0-9_.+-]{1,64}", self.job_name):
            problems.append(f"bad job name {self.job_name!r} (letters, digits, _.+-)")
        if problems:
            raise PilotError(ErrorCode.GENERALERROR, "; ".join(problems))

    @property
    def launcher_name(self) -> str:
        if self.launcher:
            return self.launcher
        return "flux" if self.scheduler == "flux" else "mpiexec"

    @property
    def total_ranks(self) -> int:
        return self.nodes * self.ranks_per_node

    @property
    def launched_ranks(self) -> int:
        """The ranks the launcher starts: with mpiexec and srun, Yoda is one extra light
        rank on the first node (it uses under 1% of a core), so every rank slot asked
        for is a droid and ``--nodes 1`` works; flux starts what was asked for."""
        return self.total_ranks if self.launcher_name == "flux" else self.total_ranks + 1

    @property
    def cores_per_node(self) -> int:
        return self.ranks_per_node * self.cores_per_rank

    @property
    def total_cores(self) -> int:
        return self.nodes * self.cores_per_node

    @property
    def run_dir(self) -> str:
        """Where the job runs: the access point in Harvester mode."""
        return self.harvester or self.workdir or self.log_dir


# --------------------------------------------------------------------------
# directives per scheduler


def _hms(seconds: int) -> str:
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Dialect(ABC):
    """One batch system: its directives, its submit command, its job ids."""

    name = "?"

    @abstractmethod
    def directives(self, req: BatchRequest) -> list[str]: ...

    @abstractmethod
    def submit_argv(self, script: Path) -> tuple[list[str], bool]:
        """The submit command, and whether the script goes to its stdin."""
        ...

    @abstractmethod
    def parse_job_id(self, stdout: str) -> str: ...


class SlurmDialect(Dialect):
    name = "slurm"

    def directives(self, req: BatchRequest) -> list[str]:
        days, rest = divmod(req.walltime, 86400)
        lines = [
            f"--job-name={req.job_name}",
            f"--nodes={req.nodes}",
            # Slurm refuses more tasks per node than the node has CPUs even with
            # --overcommit; a total task count with --overcommit is accepted.
            *(
                [f"--ntasks={req.nodes * req.ranks_per_node}", "--overcommit"]
                if req.oversubscribe
                else [f"--ntasks-per-node={req.ranks_per_node}"]
            ),
            f"--cpus-per-task={req.cores_per_rank}",
            *([f"--time={days}-{_hms(rest)}"] if req.walltime else []),
            f"--output={req.log_dir}/{req.job_name}-%j.out",
            f"--error={req.log_dir}/{req.job_name}-%j.err",
        ]
        if req.batch_queue:
            lines.append(f"--partition={req.batch_queue}")
        if req.account:
            lines.append(f"--account={req.account}")
        return [f"#SBATCH {line}" for line in (*lines, *req.extra_directives)]

    def submit_argv(self, script: Path) -> tuple[list[str], bool]:
        return ["sbatch", "--parsable", str(script)], False

    def parse_job_id(self, stdout: str) -> str:
        # --parsable prints "<id>" or "<id>;<cluster>"
        match = re.search(r"^(\d+)(?:;\S+)?\s*$", stdout.strip(), re.M)
        if not match:
            raise PilotError(ErrorCode.GENERALERROR, f"sbatch printed no job id: {stdout[-200:]!r}")
        return match.group(1)


class PbsDialect(Dialect):
    name = "pbs"

    def directives(self, req: BatchRequest) -> list[str]:
        if req.pbs_flavor == "torque":
            shape = f"nodes={req.nodes}:ppn={req.cores_per_node}"
        else:
            shape = (
                f"select={req.nodes}:ncpus={req.cores_per_node}"
                f":mpiprocs={req.ranks_per_node}:ompthreads={req.cores_per_rank}"
            )
        lines = [
            f"-N {req.job_name}",
            f"-l {shape}",
            *([f"-l walltime={_hms(req.walltime)}"] if req.walltime else []),
            f"-o {req.log_dir}/",
            f"-e {req.log_dir}/",
        ]
        if req.batch_queue:
            lines.append(f"-q {req.batch_queue}")
        if req.account:
            lines.append(f"-A {req.account}")
        return [f"#PBS {line}" for line in (*lines, *req.extra_directives)]

    def submit_argv(self, script: Path) -> tuple[list[str], bool]:
        return ["qsub", str(script)], False

    def parse_job_id(self, stdout: str) -> str:
        match = re.search(r"^(\d+(?:\[\])?(?:\.\S+)?)\s*$", stdout.strip(), re.M)
        if not match:
            raise PilotError(ErrorCode.GENERALERROR, f"qsub printed no job id: {stdout[-200:]!r}")
        return match.group(1)


class LsfDialect(Dialect):
    name = "lsf"

    def directives(self, req: BatchRequest) -> list[str]:
        minutes = math.ceil(req.walltime / 60)
        lines = [
            f"-J {req.job_name}",
            f"-n {req.total_ranks}",
            f'-R "span[ptile={req.ranks_per_node}]"',
            f'-R "affinity[core({req.cores_per_rank})]"',
            *([f"-W {minutes // 60}:{minutes % 60:02d}"] if req.walltime else []),
            f"-o {req.log_dir}/{req.job_name}-%J.out",
            f"-e {req.log_dir}/{req.job_name}-%J.err",
        ]
        if req.batch_queue:
            lines.append(f"-q {req.batch_queue}")
        if req.account:
            lines.append(f"-P {req.account}")
        return [f"#BSUB {line}" for line in (*lines, *req.extra_directives)]

    def submit_argv(self, script: Path) -> tuple[list[str], bool]:
        # bsub reads #BSUB lines only from a script given on its stdin
        return ["bsub"], True

    def parse_job_id(self, stdout: str) -> str:
        match = re.search(r"Job <(\d+)> is submitted", stdout)
        if not match:
            raise PilotError(ErrorCode.GENERALERROR, f"bsub printed no job id: {stdout[-200:]!r}")
        return match.group(1)


class FluxDialect(Dialect):
    name = "flux"

    def directives(self, req: BatchRequest) -> list[str]:
        lines = [
            f"--job-name={req.job_name}",
            f"-N {req.nodes}",
            f"-n {req.total_ranks}",
            f"-c {req.cores_per_rank}",
            *([f"-t {math.ceil(req.walltime / 60)}m"] if req.walltime else []),
            f"--output={req.log_dir}/{req.job_name}-{{{{id}}}}.out",
            f"--error={req.log_dir}/{req.job_name}-{{{{id}}}}.err",
        ]
        if req.batch_queue:
            lines.append(f"--queue={req.batch_queue}")
        if req.account:
            lines.append(f"--bank={req.account}")
        return [f"# flux: {line}" for line in (*lines, *req.extra_directives)]

    def submit_argv(self, script: Path) -> tuple[list[str], bool]:
        return ["flux", "batch", str(script)], False

    def parse_job_id(self, stdout: str) -> str:
        lines = [line.strip() for line in stdout.splitlines() if line.strip()]
        if not lines or not re.fullmatch(r"\S+", lines[-1]):
            raise PilotError(
                ErrorCode.GENERALERROR, f"flux batch printed no job id: {stdout[-200:]!r}"
            )
        return lines[-1]


DIALECTS: dict[str, Dialect] = {
    d.name: d for d in (SlurmDialect(), PbsDialect(), LsfDialect(), FluxDialect())
}
