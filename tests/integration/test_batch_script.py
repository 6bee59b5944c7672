"""The rendered batch script's body, run by bash with a real mpiexec and no
batch system: environment, work directory, the walltime-end fallback, the
exit code, and TERM to the shell reaching the ranks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpc.batch import submit_main
from tests.slurm_env import FAKE_PILOT, wait_for

pytestmark = pytest.mark.mpi

REPO = Path(__file__).resolve().parents[2]


def _render(tmp: Path, mode: str) -> tuple[Path, Path]:
    fake = tmp / "fake_pilot.py"
    fake.write_text(FAKE_PILOT, encoding="utf-8")
    out = tmp / "out"
    out.mkdir()
    (tmp / "work").mkdir()
    script = tmp / "job.sh"
    code = submit_main(
        [
            "--scheduler",
            "slurm",
            "--nodes",
            "1",
            "--walltime",
            "90s",
            "--url",
            "http://127.0.0.1:9",
            "--queue",
            "Q",
            "--ranks-per-node",
            "1",  # and Yoda: two ranks
            "--oversubscribe",
            "--log-dir",
            str(tmp),
            "--workdir",
            str(tmp / "work"),
            "--pilot-command",
            f"{sys.executable} {fake}",
            "--env",
            f"FAKE_PILOT_OUT={out}",
            "--env",
            f"FAKE_PILOT_MODE={mode}",
            "--env",
            f"PYTHONPATH={REPO}",
            "--dry-run",
            "--script-out",
            str(script),
        ]  # fmt: skip
    )
    assert code == 0
    return script, out


def _local_env() -> dict[str, str]:
    """This environment without any batch system's variables."""
    return {
        k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PBS_", "LSB_", "FLUX_"))
    }


def test_script_runs_the_ranks_without_a_batch_system(tmp_path: Path, capfd) -> None:
    script, out = _render(tmp_path, "hello")
    capfd.readouterr()
    started = time.time()
    proc = subprocess.run(
        ["bash", str(script)], capture_output=True, text=True, timeout=120, env=_local_env()
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "exit code 0" in proc.stdout
    records = [json.loads((out / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [(r["rank"], r["size"]) for r in records] == [(0, 2), (1, 2)]
    assert records[0]["resources"]["scheduler"] == "local"
    argv = records[0]["argv"]
    # No batch system to ask: the end is the script's start + 90 s.
    end = int(argv[argv.index("--walltime-end") + 1])
    assert started + 89 <= end <= records[0]["now"] + 90
    assert argv[argv.index("--workdir") + 1] == str(tmp_path / "work")


def test_term_to_the_shell_reaches_the_ranks(tmp_path: Path) -> None:
    script, out = _render(tmp_path, "term")
    proc = subprocess.Popen(
        ["bash", str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_local_env(),
    )
    try:
        wait_for(lambda: all((out / f"ready-{r}").exists() for r in (0, 1)), 60, "ranks")
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
    assert [(out / f"term-{r}").read_text() for r in (0, 1)] == ["15", "15"]
    assert "SIGTERM, forwarding" in output
    assert proc.returncode == 0, output
