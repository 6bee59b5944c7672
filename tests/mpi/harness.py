"""Run ``pilot hpc`` under a real ``mpiexec`` against the embedded dispatcher, and check
the invariant on what the dispatcher recorded."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections import Counter
from pathlib import Path

import psutil

from tests.mpi.invariants import check, journal_outputs

QUEUE = "MPIQ"


def mpiexec() -> str | None:
    return shutil.which("mpiexec")


def mpi_argv(n: int) -> list[str]:
    return [
        str(mpiexec()),
        "--allow-run-as-root",
        "--oversubscribe",
        "--with-ft",
        "ulfm",
        "-n",
        str(n),
    ]


def load_task(server, n_jobs: int, n_ranges: int, pars: str = "", per_range: int = 2) -> list[int]:
    got = server.load_task(
        {
            "nJobs": n_jobs,
            "nRanges": n_ranges,
            "nEventsPerRange": per_range,
            "job": {
                "transformation": sys.executable,
                "jobPars": f"-m pilot.payloads.toysim {pars}".strip(),
                "computingSite": QUEUE,
                "coreCount": 1,
            },
        }
    )
    return got["PandaIDs"]


def start_hpc(server, workdir: Path, *extra: str, n: int = 4, jobs: int = 1) -> subprocess.Popen:
    argv = mpi_argv(n) + [
        sys.executable,
        "-m",
        "pilot.ranks",
        "--url",
        server.url,
        "--token-file",
        str(server.token_file),
        "--queue",
        QUEUE,
        "--workdir",
        str(workdir),
        "--jobs",
        str(jobs),
        "--hb-interval",
        "1",
        "--hb-timeout",
        "20",
        *extra,
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMPI_MCA_rmaps_base_oversubscribe="1")
    log = workdir.parent / f"{workdir.name}.mpiexec.log"
    for _ in range(3):  # bounded: a launcher that cannot start at all fails the test
        seen = log.stat().st_size if log.exists() else 0
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                cwd=str(workdir.parent),
            )
        if not _launch_failed(proc, workdir, log, seen):
            return proc
    return proc


# Open MPI's launcher now and then fails before any rank starts (a start-up race in
# PMIx, seen on loaded machines); that is the launcher's, not the pilot's, so it is retried.
_LAUNCHER_RACE = b"PMIx server's listener thread failed to start"


def _launch_failed(proc: subprocess.Popen, workdir: Path, log: Path, seen: int) -> bool:
    """True if mpiexec died of the start-up race before rank 0 came up."""
    started = workdir / "logs" / "rank0.log"
    deadline = time.monotonic() + 30
    while proc.poll() is None and time.monotonic() < deadline:
        if started.exists():
            return False
        time.sleep(0.05)
    if proc.poll() is None:
        return False
    with open(log, "rb") as fh:
        fh.seek(seen)
        return _LAUNCHER_RACE in fh.read()


class Launched:
    """Every mpiexec a test started, killed at teardown if still running (a failed
    assertion must not leave ranks behind)."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, server, workdir: Path, *extra: str, n: int = 4, jobs: int = 1):
        proc = start_hpc(server, workdir, *extra, n=n, jobs=jobs)
        self.procs.append(proc)
        return proc

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                kill_all(proc)


def wait(proc: subprocess.Popen, timeout: float) -> int:
    """Exit code of mpiexec; on a timeout, the ranks' Python stacks go into the error."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        stacks = dump_stacks(proc)
        kill_all(proc)
        raise AssertionError(
            f"mpiexec still running after {timeout} s; stacks:\n{stacks}"
        ) from None


def dump_stacks(proc: subprocess.Popen) -> str:
    """SIGUSR2 makes every rank and rank 0's upstream link write their stacks (faulthandler)
    to logs/rank<N>.stacks and logs/link.stacks; with them go the tails of the link's and
    rank 0's logs and the stacks of this process (the embedded server's threads), so a
    hang shows which side sat waiting."""
    found = []
    for rank, p in sorted(_rank_procs(proc).items()):
        try:
            p.send_signal(signal.SIGUSR2)
            found.append((f"rank {rank}", f"rank{rank}.stacks", p))
        except psutil.NoSuchProcess:
            pass
    for p in _link_procs(proc):
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGUSR2)
            found.append((f"link {p.pid}", "link.stacks", p))
    time.sleep(1.0)
    out = []
    args = [str(a) for a in proc.args] if isinstance(proc.args, (list, tuple)) else []
    work = Path(args[args.index("--workdir") + 1]) if "--workdir" in args else None
    for name, stacks, p in found:
        try:
            status = p.status()
        except psutil.NoSuchProcess:
            continue
        text = _tail(work / "logs" / stacks, 3000) if work else ""
        out.append(f"{name} ({status}):\n{text}")
    if work is not None:
        for log in ("link.log", "rank0.log"):
            out.append(f"tail of {log}:\n{_tail(work / 'logs' / log, 3000)}")
    me = threading.get_ident()
    for ident, frame in sys._current_frames().items():  # the embedded server's threads
        if ident != me:
            out.append(
                f"thread {ident} of this process:\n{''.join(traceback.format_stack(frame)[-6:])}"
            )
    return "\n".join(out)


def _tail(path: Path, n: int) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError as exc:
        return f"({exc})"


def _link_procs(proc: subprocess.Popen) -> list[psutil.Process]:
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    found = []
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            if "yoda.link" in child.cmdline():
                found.append(child)
    return found


def _rank_procs(proc: subprocess.Popen) -> dict[int, psutil.Process]:
    found = {}
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return found
    for child in children:
        try:
            rank = child.environ().get("OMPI_COMM_WORLD_RANK")
            if rank is not None and "pilot.ranks" in " ".join(child.cmdline()):
                found[int(rank)] = child
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def kill_all(proc: subprocess.Popen) -> None:
    """SIGKILL what ``proc`` started: its ranks, their payloads (own sessions), and itself."""
    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(10)


def ranks(proc: subprocess.Popen, timeout: float = 30.0) -> dict[int, psutil.Process]:
    """Rank number -> process of the ranks started by ``proc`` (from their environment)."""
    deadline = time.monotonic() + timeout
    delay = 0.05
    while time.monotonic() < deadline:
        found = _rank_procs(proc)
        try:
            size = int(next(iter(found.values())).environ()["OMPI_COMM_WORLD_SIZE"]) if found else 0
        except (psutil.NoSuchProcess, psutil.AccessDenied, KeyError):
            size = 0
        if found and len(found) == size:
            return found
        time.sleep(delay)
        delay = min(0.5, delay * 2)
    raise TimeoutError("ranks did not appear")


def wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    delay = 0.05
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(delay)
        delay = min(0.5, delay * 2)


def accepted_terminal(server) -> int:
    rows = server.store._query(
        "SELECT COUNT(*) AS n FROM range_updates WHERE accepted = 1"
        " AND status IN ('finished','failed','fatal')"
    )
    return rows[0]["n"]


def invariant(server, workdir: Path, *, require_all: bool = True) -> tuple[list[str], Counter]:
    """Problems (empty: all good) and the final status counts of the dispatched ranges."""
    ranges = server.store.ranges()
    dispatched = [r["range_id"] for r in ranges if r["status"] != "ready"]
    rows = server.store._query("SELECT range_id, status FROM range_updates WHERE accepted = 1")
    updates = [{"eventRangeID": r["range_id"], "eventStatus": r["status"]} for r in rows]
    attempts = server.store._query(
        "SELECT range_id, COUNT(*) AS n FROM range_updates GROUP BY range_id HAVING n > 1"
    )
    problems = check(
        dispatched,
        updates,
        require_all=require_all,
        outputs=journal_outputs(workdir / "yoda.journal"),
    )
    if attempts:
        problems.append(f"{len(attempts)} ranges updated more than once")
    return problems, Counter(r["status"] for r in ranges)
