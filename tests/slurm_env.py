"""The real single-node Slurm for the batch tests, set up at most once.

``ensure_slurm()`` runs ``hpc/scripts/slurm-single-node.sh`` the first time
it is called in a test session and returns ``None`` when Slurm is usable, or
the reason it cannot be (not root, no package access) for ``pytest.skip``.
A setup that should have worked and did not raises, so a broken Slurm fails
the tests instead of skipping them quietly.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import textwrap
import time
from pathlib import Path

import hpc

SCRIPT = Path(hpc.__file__).resolve().parent / "scripts" / "slurm-single-node.sh"
SETUP_TIMEOUT = 1200.0
TERMINAL_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED"}
)


@functools.lru_cache(maxsize=1)
def _setup() -> tuple[int, str]:
    try:
        proc = subprocess.run(
            ["bash", str(SCRIPT)],
            capture_output=True,
            text=True,
            timeout=SETUP_TIMEOUT,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return 124, f"setup did not finish in {SETUP_TIMEOUT:.0f}s"
    return proc.returncode, (proc.stdout + proc.stderr).strip()


def ensure_slurm() -> str | None:
    """None when Slurm is usable; the reason when it cannot be here."""
    if not hasattr(os, "geteuid"):
        return "Slurm needs a POSIX system"
    code, output = _setup()
    if code == 0:
        return None
    if code == 2:
        return f"single-node Slurm unavailable: not root ({output[-200:]})"
    if code == 3:
        return f"single-node Slurm unavailable: no package access ({output[-200:]})"
    raise RuntimeError(f"{SCRIPT.name} failed (exit {code}): {output[-1500:]}")


def slurm(*argv: str, timeout: float = 30.0) -> str:
    """Run a Slurm client command; its stdout, or an AssertionError with stderr."""
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr}")
    return proc.stdout


def job_state(job_id: str) -> str:
    """The job's state word (PENDING, RUNNING, COMPLETED, ...)."""
    text = slurm("scontrol", "show", "job", job_id)
    match = re.search(r"\bJobState=(\S+)", text)
    return match.group(1) if match else "UNKNOWN"


def wait_for(predicate, timeout: float, what: str) -> None:
    """Poll ``predicate`` with backoff (0.2 s doubling to 2 s) until true."""
    deadline = time.monotonic() + timeout
    delay = 0.2
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(delay)
        delay = min(2.0, delay * 2)


def wait_for_job(job_id: str, timeout: float = 90.0) -> str:
    """Wait until the job has ended; its final state."""
    states: list[str] = []

    def ended() -> bool:
        states.append(job_state(job_id))
        return states[-1] in TERMINAL_STATES

    try:
        wait_for(ended, timeout, f"Slurm job {job_id} to end")
    except AssertionError:
        subprocess.run(["scancel", job_id], capture_output=True, timeout=30, check=False)
        raise
    return states[-1]


# A stand-in for `pilot` in batch test jobs: records its rank, arguments and
# (rank 0) the resources it detects; in "term" mode waits for SIGTERM and
# leaves a marker; in "srun" mode runs without MPI as an srun task.
FAKE_PILOT = textwrap.dedent(
    """\
    import json, os, signal, sys, time

    out = os.environ["FAKE_PILOT_OUT"]
    if os.environ.get("FAKE_PILOT_MODE") == "srun":  # tasks started by srun, no MPI
        rank = int(os.environ["SLURM_PROCID"])
        record = {"rank": rank, "size": int(os.environ["SLURM_NTASKS"]), "argv": sys.argv[1:],
                  "step": os.environ.get("SLURM_STEP_ID")}
        with open(os.path.join(out, f"rank-{rank}.json"), "w") as f:
            json.dump(record, f)
        sys.exit(0)

    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()

    def done(signum, frame):
        with open(os.path.join(out, f"term-{rank}"), "w") as f:
            f.write(str(signum))
        sys.exit(0)

    if os.environ.get("FAKE_PILOT_MODE") == "term":
        signal.signal(signal.SIGTERM, done)
        open(os.path.join(out, f"ready-{rank}"), "w").close()
        for _ in range(600):  # at most 60 s
            time.sleep(0.1)
        sys.exit(3)
    record = {"rank": rank, "size": comm.Get_size(), "argv": sys.argv[1:],
              "host": MPI.Get_processor_name(), "now": time.time()}
    if rank == 0:
        from hpc.resources import detect_resources
        record["resources"] = detect_resources().to_dict()
    names = comm.gather(record["host"], root=0)
    record["gathered"] = names
    with open(os.path.join(out, f"rank-{rank}.json"), "w") as f:
        json.dump(record, f)
    """
)
