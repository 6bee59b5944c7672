"""Real payloads that break each limit are caught with the right code and leave no process behind."""

from __future__ import annotations

import shutil
import sys
from dataclasses import replace
from pathlib import Path

import psutil
import pytest

from pilot.config import PilotConfig
from pilot.errors import ErrorCode, PilotError
from pilot.job import Job
from pilot.monitor.limits import Limits
from pilot.monitor.sampler import COLUMNS, OUTPUT_NAME, read_series
from pilot.monitor.watch import EVIDENCE_NAME, JobMonitor, make_monitor
from pilot.payload.runner import KillRecord, PayloadProcess

PY = sys.executable
# Generous enough never to fire by accident; each test lowers one of them.
LOOSE = Limits(looping_s=60, walltime_s=60)


def run_monitored(
    workdir: Path, argv: list[str], limits: Limits, *, max_turns: int = 400
) -> tuple[PilotError | None, KillRecord | None, JobMonitor, PayloadProcess]:
    """The workflow's loop in small: wait, check, save evidence, kill the tree."""
    payload = PayloadProcess(
        argv, cwd=workdir, stdout=workdir / "payload.stdout", stderr=workdir / "payload.stderr"
    )
    monitor = JobMonitor(payload, workdir, limits, interval=0.1, disk_interval=0.2)
    breach = record = None
    try:
        for _ in range(max_turns):
            if payload.wait(timeout=max(0.02, monitor.next_due())) is not None:
                break
            breach = monitor.check()
            if breach is not None:
                monitor.save_evidence()
                record = payload.kill_tree(2.0, int(breach.code), breach.detail)
                break
    finally:
        if payload.poll() is None:
            payload.kill_tree(1.0)
    return breach, record, monitor, payload


def assert_no_survivor(record: KillRecord | None) -> None:
    assert record is not None
    assert record.survivors == []
    for pid in record.pids:
        if psutil.pid_exists(pid):
            assert psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_memory_over_limit_of_the_whole_tree(tmp_path: Path) -> None:
    # Two children of 50 MB each: neither alone crosses 80 MB, the tree does.
    child = "import time; x = b'\\x01' * (50 * 1024 * 1024); time.sleep(30)"
    script = f"import subprocess, sys; ps = [subprocess.Popen([sys.executable, '-c', {child!r}]) for _ in range(2)]; [p.wait() for p in ps]"
    breach, record, monitor, _ = run_monitored(
        tmp_path, [PY, "-c", script], replace(LOOSE, memory_kb=80 * 1024)
    )
    assert breach is not None and breach.code == ErrorCode.PAYLOADEXCEEDMAXMEM
    assert "PSS" in breach.detail
    assert_no_survivor(record)
    assert len(record.pids) >= 3
    summary = monitor.summary()
    assert summary["maxPSS"] > 80 * 1024
    assert summary["maxRSS"] >= summary["maxPSS"] // 2
    evidence = (tmp_path / EVIDENCE_NAME).read_text()
    assert "1235 PAYLOADEXCEEDMAXMEM" in evidence and "process tree:" in evidence
    assert str(record.pids[-1]) in evidence
    header = (tmp_path / OUTPUT_NAME).read_text().splitlines()[0]
    assert header.split("\t") == list(COLUMNS)
    assert read_series(tmp_path / OUTPUT_NAME)[-1].pss > 80 * 1024


def test_sleeping_payload_is_looping(tmp_path: Path) -> None:
    breach, record, _, _ = run_monitored(
        tmp_path, ["sh", "-c", "sleep 30; echo done"], replace(LOOSE, looping_s=1.0)
    )
    assert breach is not None and breach.code == ErrorCode.LOOPINGJOB
    assert_no_survivor(record)


def test_cpu_progress_is_not_looping_but_walltime_ends_it(tmp_path: Path) -> None:
    # Burns CPU and writes nothing: not looping by the CPU rule, stopped by walltime.
    burn = "import time\nend = time.time() + 30\nwhile time.time() < end: sum(range(10000))"
    breach, record, monitor, _ = run_monitored(
        tmp_path, [PY, "-c", burn], replace(LOOSE, looping_s=0.6, walltime_s=2.5)
    )
    assert breach is not None and breach.code == ErrorCode.REACHEDMAXTIME, breach
    assert_no_survivor(record)
    assert monitor.summary()["cpuConsumptionTime"] >= 0


def test_workdir_too_large(tmp_path: Path) -> None:
    script = "import time; open('big.dat', 'wb').write(b'0' * 3 * 1024 * 1024); time.sleep(30)"
    breach, record, _, _ = run_monitored(
        tmp_path, [PY, "-c", script], replace(LOOSE, workdir_max_mb=1)
    )
    assert breach is not None and breach.code == ErrorCode.USERDIRTOOLARGE
    assert_no_survivor(record)


def test_no_local_space(tmp_path: Path) -> None:
    free_mb = shutil.disk_usage(tmp_path).free / 1024 / 1024
    breach, record, _, _ = run_monitored(
        tmp_path, ["sleep", "30"], replace(LOOSE, min_free_space_mb=free_mb + 10**7)
    )
    assert breach is not None and breach.code == ErrorCode.NOLOCALSPACE
    assert_no_survivor(record)


def test_stdout_too_big(tmp_path: Path) -> None:
    script = "import sys, time; sys.stdout.write('x' * 2 * 1024 * 1024); sys.stdout.flush(); time.sleep(30)"
    breach, record, _, _ = run_monitored(
        tmp_path, [PY, "-c", script], replace(LOOSE, stdout_max_mb=1)
    )
    assert breach is not None and breach.code == ErrorCode.STDOUTTOOBIG
    assert "payload.stdout" in breach.detail
    assert_no_survivor(record)


def test_escaped_grandchild_is_killed_too(tmp_path: Path) -> None:
    # A grandchild that leaves the process group (setsid) must not survive a looping kill.
    script = "setsid sleep 30 & sleep 30"
    breach, record, _, _ = run_monitored(
        tmp_path, ["sh", "-c", script], replace(LOOSE, looping_s=1)
    )
    assert breach is not None and breach.code == ErrorCode.LOOPINGJOB
    assert_no_survivor(record)


def test_payload_within_limits_finishes_with_a_summary(tmp_path: Path) -> None:
    script = "import time\nfor i in range(4):\n    open(f'out{i}', 'w').write('x' * 100000)\n    time.sleep(0.15)"
    breach, record, monitor, payload = run_monitored(
        tmp_path, [PY, "-c", script], replace(LOOSE, memory_kb=10**7, looping_s=5)
    )
    assert breach is None and record is None
    assert payload.returncode == 0
    summary = monitor.summary()
    for key in ("maxRSS", "maxPSS", "avgPSS", "totWCHAR", "cpuConsumptionTime"):
        assert key in summary
    assert summary["totWCHAR"] >= 400000
    monitor.close()
    assert (tmp_path / "memory_monitor_summary.json").exists()


@pytest.mark.parametrize("interval", [0.1])
def test_next_due_never_negative(tmp_path: Path, interval: float) -> None:
    payload = PayloadProcess(["sleep", "5"], cwd=tmp_path)
    try:
        monitor = JobMonitor(payload, tmp_path, LOOSE, interval=interval)
        assert monitor.next_due() == 0.0  # the first sample is due at once
        assert monitor.check() is None
        assert 0.0 < monitor.next_due() <= interval
    finally:
        payload.kill_tree(1.0)


def test_workflow_factory_takes_limits_from_job_and_queue(tmp_path: Path) -> None:
    job = Job.from_panda({"PandaID": "5", "transformation": "x", "maxWalltime": "7200"})
    config = PilotConfig(
        workdir=tmp_path, monitor_interval=5.0, queue={"maxrss": "100", "maxtime": "3600"}
    )
    payload = PayloadProcess(["sleep", "5"], cwd=tmp_path)
    try:
        monitor = make_monitor(payload, tmp_path, job, config)
        assert monitor.interval == 5.0
        assert monitor.limits.memory_kb == 100 * 1024 and monitor.limits.walltime_s == 3600
        assert monitor.connections.policy.describe() == "report"
    finally:
        payload.kill_tree(1.0)
