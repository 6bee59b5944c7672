"""Signals to the pilot and limits of the payload, through `pilot run` itself."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import PYTHON, REPO, job_dict, write_job

BEHAVE = str(REPO / "tests" / "payloads" / "behave.py")


def _wait_for_payload(workdir: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    delay = 0.02
    while not (workdir / "payload.stdout").exists():
        assert time.monotonic() < deadline, "the payload never started"
        time.sleep(delay)
        delay = min(2 * delay, 0.3)


@pytest.mark.parametrize(
    ("signame", "code"), [("SIGTERM", 1201), ("SIGQUIT", 1202), ("SIGUSR1", 1207)]
)
def test_signal_to_pilot_sends_final_update(tmp_path: Path, signame: str, code: int) -> None:
    job = write_job(tmp_path / "job.json", job_dict(2001, jobpars=f"{BEHAVE} sleep 300"))
    proc = subprocess.Popen(
        [
            PYTHON,
            "-m",
            "pilot.cli",
            "run",
            "--job-file",
            str(job),
            "--workdir",
            str(tmp_path / "w"),
            "--kill-grace",
            "2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    workdir = tmp_path / "w" / "PandaJob_2001"
    try:
        _wait_for_payload(workdir)
        children = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(getattr(signal, signame))
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, out + err
    record = json.loads((workdir / "final_update.json").read_text())
    assert record["state"] == "failed" and record["pilotErrorCode"] == code
    assert signame in record["pilotErrorDiag"]
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]


def test_memory_limit_through_cli(tmp_path: Path) -> None:
    hog = "import time; x = bytearray(300 * 1024 * 1024); x[::4096] = b'y' * len(x[::4096]); time.sleep(120)"
    job = write_job(tmp_path / "job.json", job_dict(2002, jobpars=f'-c "{hog}"', minRamCount="50"))
    proc = subprocess.run(
        [PYTHON, "-m", "pilot.cli", "run", "--job-file", str(job), "--workdir", str(tmp_path / "w"),
         "--monitor-interval", "0.5", "--kill-grace", "2"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1
    record = json.loads((tmp_path / "w" / "PandaJob_2002" / "final_update.json").read_text())
    assert record["pilotErrorCode"] == 1235, record["pilotErrorDiag"]
    assert int(record["maxPSS"]) > 100_000 or int(record["maxRSS"]) > 100_000
    assert (tmp_path / "w" / "PandaJob_2002" / "monitor_evidence.txt").is_file()
