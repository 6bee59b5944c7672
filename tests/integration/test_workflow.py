"""One job's whole life on one node, with real payload processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest

from pilot.comm.base import LocalUpstream
from pilot.config import PilotConfig
from pilot.data.checksum import adler32_file
from pilot.job import Job
from pilot.workflow import StopSignal, run_job
from tests.conftest import PYTHON, REPO, adler32_of, job_dict

BEHAVE = str(REPO / "tests" / "payloads" / "behave.py")


def run(config: PilotConfig, d: dict, stop: StopSignal | None = None):
    job = Job.from_panda(d)
    return run_job(job, config, LocalUpstream(config.job_workdir(job.panda_id)), stop=stop)


def final_record(config: PilotConfig, panda_id: int) -> dict:
    return json.loads((config.job_workdir(panda_id) / "final_update.json").read_text())


def test_outputs_have_sizes_and_checksums(config: PilotConfig, storage: Path) -> None:
    data = b"input bytes\n" * 1000
    (storage / "test").mkdir()
    (storage / "test" / "in.dat").write_bytes(data)
    d = job_dict(
        jobpars=f"{BEHAVE} write out.dat 70000",
        inFiles="in.dat",
        GUID="g-in",
        fsize=str(len(data)),
        checksum=f"ad:{adler32_of(data)}",
        scopeIn="test",
        outFiles="out.dat,log.1001.tgz",
        scopeOut="test",
    )
    result = run(config, d)
    assert result.state == "finished", result.pilot_error_diag
    rec = final_record(config, 1001)
    assert rec["state"] == "finished" and rec["pilotErrorCode"] == 0 and rec["transExitCode"] == 0
    files = json.loads(rec["xml"])
    out = Path(config.output_url) / "test" / "out.dat"
    assert files["out.dat"]["fsize"] == 70000 == out.stat().st_size
    assert files["out.dat"]["adler32"] == adler32_file(out)
    assert files["out.dat"]["guid"]
    log_path = Path(config.output_url) / "test" / "log.1001.tgz"
    assert files["log.1001.tgz"]["adler32"] == adler32_file(log_path)
    assert "wrote out.dat 70000" in rec["pilotLog"]
    report = json.loads((config.job_workdir(1001) / "pilot_job_report.json").read_text())
    assert report["files"]["output"][0]["adler32"] == files["out.dat"]["adler32"]


@pytest.mark.parametrize(
    ("jobpars", "code", "exe"),
    [
        (f"{BEHAVE} segv", 1328, 128 + signal.SIGSEGV),
        (f"{BEHAVE} signal SIGKILL", 1200, 128 + signal.SIGKILL),
        (f"{BEHAVE} signal SIGBUS", 1206, 128 + signal.SIGBUS),
        (f"{BEHAVE} exit 7 something went wrong", 1305, 7),
        (f"{BEHAVE} exit 3 terminate called after throwing an instance of std::bad_alloc", 1223, 3),
    ],
)
def test_payload_failures_get_their_codes(
    config: PilotConfig, jobpars: str, code: int, exe: int
) -> None:
    result = run(config, job_dict(jobpars=jobpars))
    assert result.state == "failed"
    rec = final_record(config, 1001)
    assert rec["pilotErrorCode"] == code, rec["pilotErrorDiag"]
    assert rec["exeErrorCode"] == exe and rec["transExitCode"] == exe
    assert rec["pilotErrorDiag"] and len(rec["pilotErrorDiag"]) <= 256
    # the failure is among the pilot's critical lines sent as log extracts
    assert "failed" in rec["pilotLog"]


def test_payload_not_found(config: PilotConfig) -> None:
    result = run(config, job_dict(transformation="no-such-transform.py", jobpars="--in x"))
    assert result.pilot_error_code == 1346
    assert final_record(config, 1001)["transExitCode"] == 127


def test_missing_output_fails_stage_out(config: PilotConfig) -> None:
    result = run(config, job_dict(jobpars=f"{BEHAVE} exit 0", outFiles="never.dat,log.1001.tgz"))
    assert result.pilot_error_code == 1165
    # the log is still staged out for a failed job
    assert (Path(config.output_url) / "test" / "log.1001.tgz").is_file()


def test_missing_input_is_1331(config: PilotConfig) -> None:
    d = job_dict(
        jobpars=f"{BEHAVE} exit 0",
        inFiles="absent.dat",
        GUID="g",
        fsize="10",
        checksum="ad:00000001",
    )
    assert run(config, d).pilot_error_code == 1331


def test_input_checksum_mismatch(config: PilotConfig, storage: Path) -> None:
    (storage / "in.dat").write_bytes(b"corrupted replica")
    d = job_dict(jobpars=f"{BEHAVE} exit 0", inFiles="in.dat", GUID="g", checksum="ad:00000001")
    assert run(config, d).pilot_error_code == 1171


def _wait_for(path: Path, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    delay = 0.01
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} never appeared")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def test_forked_tree_is_killed_completely(config: PilotConfig) -> None:
    stop = StopSignal()
    marker = config.job_workdir(1001) / "pids"

    def stop_when_ready() -> None:
        _wait_for(marker)
        stop.trigger(signal.SIGTERM)

    t = threading.Thread(target=stop_when_ready, daemon=True)
    t.start()
    result = run(config, job_dict(jobpars=f"{BEHAVE} forktree {marker}"), stop=stop)
    t.join(5)
    stop.close()
    assert result.pilot_error_code == 1201
    pids = [int(p) for p in marker.read_text().split()]
    assert len(pids) == 4
    survivors = [
        p
        for p in pids
        if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
    ]
    # the grandchild's own child is found through the payload tag
    tagged = [
        p.pid
        for p in psutil.process_iter()
        if _safe_environ(p).get("PANDA_PILOT_PAYLOAD_TAG", "").startswith(str(os.getpid()))
    ]
    assert survivors == [] and tagged == []


def _safe_environ(p: psutil.Process) -> dict:
    try:
        return p.environ()
    except psutil.Error:
        return {}


def test_cli_runs_the_example(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            "pilot",
            "run",
            "--job-file",
            str(REPO / "examples" / "job.json"),
            "--workdir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "finished" in proc.stdout
    assert (tmp_path / "storage" / "example" / "digest.txt").is_file()


def test_cli_bad_definition_exit_status(tmp_path: Path) -> None:
    bad = tmp_path / "job.json"
    bad.write_text('{"PandaID": "77", "transformation": "x", "inFiles": "a,b", "GUID": "g"}')
    proc = subprocess.run(
        [
            PYTHON,
            "-m",
            "pilot.cli",
            "run",
            "--job-file",
            str(bad),
            "--workdir",
            str(tmp_path / "w"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "1312" in proc.stderr and "NOTSAMELENGTH" in proc.stderr
    rec = json.loads((tmp_path / "w" / "PandaJob_77" / "final_update.json").read_text())
    assert rec["pilotErrorCode"] == 1312 and rec["state"] == "failed"
