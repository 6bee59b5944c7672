"""`pilot hpc submit` against the real single-node Slurm.

The rendered script runs a stand-in for `pilot` (a small mpi4py program that
records its rank, its arguments and, on rank 0, the resources it detects)
under Open MPI's `mpiexec` inside a real sbatch allocation. Jobs last
seconds; every wait is bounded.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hpc.batch import submit_main
from tests.slurm_env import (
    FAKE_PILOT,
    ensure_slurm,
    job_state,
    slurm,
    wait_for,
    wait_for_job,
)

pytestmark = pytest.mark.slurm

# The job imports the code under test, not whatever copy is installed.
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def slurm_up() -> None:
    reason = ensure_slurm()
    if reason:
        pytest.skip(reason)


def _submit(tmp: Path, mode: str, *extra: str) -> str:
    fake = tmp / "fake_pilot.py"
    fake.write_text(FAKE_PILOT, encoding="utf-8")
    out = tmp / "out"
    out.mkdir(exist_ok=True)
    argv = [
        "--scheduler", "slurm", "--nodes", "1", "--walltime", "2",
        "--url", "http://127.0.0.1:9", "--queue", "TEST_QUEUE",
        "--ranks-per-node", "1", "--oversubscribe",  # and Yoda: two ranks
        "--log-dir", str(tmp / "logs"), "--workdir", str(tmp / "work"),
        "--pilot-command", f"{sys.executable} {fake}",
        "--env", f"FAKE_PILOT_OUT={out}", "--env", f"FAKE_PILOT_MODE={mode}",
        "--env", f"PYTHONPATH={REPO}",
        *extra,
    ]  # fmt: skip
    (tmp / "work").mkdir(exist_ok=True)
    proc = subprocess.run(
        [sys.executable, "-m", "hpc.batch", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip()
    assert re.fullmatch(r"\d+", job_id), proc.stdout
    return job_id


def _logs(tmp: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted((tmp / "logs").glob("*.*")))


def test_dry_run_renders_a_script_slurm_accepts(slurm_up, tmp_path, capsys) -> None:
    code = submit_main(
        [
            "--scheduler",
            "slurm",
            "--nodes",
            "1",
            "--walltime",
            "5",
            "--harvester",
            str(tmp_path),
            "--ranks-per-node",
            "2",
            "--dry-run",
            "--log-dir",
            str(tmp_path),
        ]  # fmt: skip
    )
    assert code == 0
    script = capsys.readouterr().out
    assert "#SBATCH --nodes=1" in script
    assert "#SBATCH --ntasks-per-node=2" in script
    path = tmp_path / "job.sh"
    path.write_text(script, encoding="utf-8")
    # --test-only: Slurm parses and schedules the script without running it.
    proc = subprocess.run(
        ["sbatch", "--test-only", str(path)], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr
    assert "to start at" in proc.stderr


@pytest.fixture(scope="module")
def hello_job(slurm_up, tmp_path_factory) -> tuple[str, Path, float]:
    tmp = tmp_path_factory.mktemp("hello")
    submitted = time.time()
    job_id = _submit(tmp, "hello")
    state = wait_for_job(job_id, timeout=120)
    assert state == "COMPLETED", f"job {job_id} {state}:\n{_logs(tmp)}"
    return job_id, tmp, submitted


def test_sbatch_job_runs_mpiexec_ranks(hello_job) -> None:
    job_id, tmp, _ = hello_job
    records = [json.loads((tmp / "out" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in records] == [0, 1]
    assert all(r["size"] == 2 for r in records)
    assert records[0]["gathered"] == [records[0]["host"], records[1]["host"]]
    argv = records[0]["argv"]
    assert argv[:5] == ["hpc", "--url", "http://127.0.0.1:9", "--queue", "TEST_QUEUE"]
    assert argv[argv.index("--workdir") + 1] == str(tmp / "work")
    end = int(argv[argv.index("--walltime-end") + 1])
    assert records[0]["now"] < end <= records[0]["now"] + 120
    log = _logs(tmp)
    assert "pilot batch job started" in log and "exit code 0" in log


def test_resources_inside_a_real_allocation(hello_job) -> None:
    job_id, tmp, submitted = hello_job
    record = json.loads((tmp / "out" / "rank-0.json").read_text())
    res = record["resources"]
    assert res["scheduler"] == "slurm"
    assert res["job_id"] == job_id
    assert res["nodes"] == [socket.gethostname().split(".")[0]]
    assert res["ranks_per_node"] == 1  # the allocation's rank slots; Yoda is one more
    assert res["cores_per_node"] >= 1
    # --walltime 2 (minutes): the allocation ends 120 s after it started.
    assert res["end_time"] is not None
    assert submitted + 60 <= res["end_time"] <= record["now"] + 121
    # The script passed the same end to the ranks (`pilot hpc --walltime-end`).
    argv = record["argv"]
    assert int(argv[argv.index("--walltime-end") + 1]) == int(res["end_time"])


def test_srun_launcher_starts_the_tasks(slurm_up, tmp_path) -> None:
    job_id = _submit(tmp_path, "srun", "--launcher", "srun")
    state = wait_for_job(job_id, timeout=120)
    assert state == "COMPLETED", f"job {job_id} {state}:\n{_logs(tmp_path)}"
    records = [json.loads((tmp_path / "out" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [(r["rank"], r["size"]) for r in records] == [(0, 2), (1, 2)]
    assert records[0]["step"] not in (None, "batch")  # a job step of its own
    assert records[0]["argv"][:3] == ["hpc", "--url", "http://127.0.0.1:9"]


def test_scancel_term_reaches_the_ranks(slurm_up, tmp_path) -> None:
    job_id = _submit(tmp_path, "term")
    out = tmp_path / "out"
    try:
        wait_for(
            lambda: all((out / f"ready-{r}").exists() for r in (0, 1)),
            60,
            f"ranks of job {job_id} to start",
        )
        # --batch: only the batch shell; the script forwards TERM to mpiexec.
        slurm("scancel", "--batch", "--signal=TERM", job_id)
        wait_for(
            lambda: all((out / f"term-{r}").exists() for r in (0, 1)),
            30,
            f"SIGTERM markers of job {job_id}",
        )
    except BaseException as exc:
        # cancelled only on a failure: cancelling a job that is ending on its own races its
        # completion, and the job is then recorded CANCELLED
        told = f"{exc}\nstate {job_state(job_id)}\n{_logs(tmp_path)}"
        subprocess.run(["scancel", job_id], capture_output=True, timeout=30, check=False)
        if isinstance(exc, AssertionError):
            raise AssertionError(told) from exc
        raise
    assert (out / "term-0").read_text() == "15"
    # The ranks exit 0 after their drain, so the job ends as a success.
    state = wait_for_job(job_id, timeout=60)
    log = _logs(tmp_path)
    assert state == "COMPLETED", log
    assert "SIGTERM, forwarding" in log and "exit code 0" in log


def test_scancel_term_reaches_a_plain_batch_script(slurm_up, tmp_path) -> None:
    script = tmp_path / "trap.sh"
    marker = tmp_path / "marker"
    ready = tmp_path / "ready"
    script.write_text(
        textwrap.dedent(
            f"""\
            #!/bin/bash
            #SBATCH --time=1
            #SBATCH --output={tmp_path}/trap-%j.out
            trap 'echo TERM > {marker}; exit 0' TERM
            touch {ready}
            for i in $(seq 1 120); do sleep 0.5; done
            """
        ),
        encoding="utf-8",
    )
    job_id = slurm("sbatch", "--parsable", str(script)).strip().split(";")[0]
    try:
        wait_for(ready.exists, 60, f"job {job_id} to start")
        slurm("scancel", "--batch", "--signal=TERM", job_id)
        wait_for(marker.exists, 30, f"the TERM marker of job {job_id}")
    except BaseException:
        subprocess.run(["scancel", job_id], capture_output=True, timeout=30, check=False)
        raise
    assert marker.read_text().strip() == "TERM"
    assert wait_for_job(job_id, timeout=60) == "COMPLETED"
