"""JobMonitor scheduling and decisions, driven with explicit times on a real idle payload."""

from __future__ import annotations

from pathlib import Path

import pytest

from pilot.errors import ErrorCode
from pilot.monitor.limits import Limits
from pilot.monitor.watch import JobMonitor
from pilot.payload.runner import PayloadProcess


@pytest.fixture
def idle(tmp_path: Path):
    payload = PayloadProcess(["sleep", "30"], cwd=tmp_path, stdout=tmp_path / "out")
    yield payload
    payload.kill_tree(1.0)


def test_walltime_due_time_and_sticky_breach(idle: PayloadProcess, tmp_path: Path) -> None:
    monitor = JobMonitor(
        idle, tmp_path, Limits(walltime_s=100), interval=30, disk_interval=60,
        connection_interval=40,
    )  # fmt: skip
    t0 = monitor.started
    assert monitor.check(now=t0) is None
    assert monitor.next_due(now=t0) == pytest.approx(30)
    assert monitor.next_due(now=t0 + 90) == pytest.approx(0)  # sample and walk overdue
    assert monitor.check(now=t0 + 60) is None
    assert monitor.next_due(now=t0 + 95) == pytest.approx(0)
    breach = monitor.check(now=t0 + 101)
    assert breach is not None and breach.code == ErrorCode.REACHEDMAXTIME
    assert monitor.check(now=t0 + 102) is breach  # kept until the caller acts on it
    assert "1213 REACHEDMAXTIME" in monitor.evidence()


def test_sockets_are_looked_at_more_often_than_the_rest(idle: PayloadProcess, tmp_path: Path):
    monitor = JobMonitor(idle, tmp_path, Limits(), interval=30, connection_interval=1.5)
    t0 = monitor.started
    assert monitor.check(now=t0) is None
    assert monitor.next_due(now=t0) == pytest.approx(1.5)
    assert monitor.check(now=t0 + 1.5) is None
    assert monitor.next_due(now=t0 + 1.5) == pytest.approx(1.5)


def test_looping_waits_for_the_limit(idle: PayloadProcess, tmp_path: Path) -> None:
    monitor = JobMonitor(idle, tmp_path, Limits(looping_s=600), interval=60)
    t0 = monitor.started + 1000  # past every file's mtime
    monitor.last_progress = monitor.last_touch = t0
    assert monitor.check(now=t0) is None
    assert monitor.check(now=t0 + 300) is None
    breach = monitor.check(now=t0 + 601)
    assert breach is not None and breach.code == ErrorCode.LOOPINGJOB
    assert "601 s" in breach.detail


def test_stdout_write_counts_as_a_touch(idle: PayloadProcess, tmp_path: Path) -> None:
    monitor = JobMonitor(idle, tmp_path, Limits(looping_s=600), interval=60, disk_interval=60)
    start = monitor.started
    assert monitor.check(now=start) is None
    assert monitor.last_touch >= start - 1  # the payload's stdout file was just created
    summary = monitor.summary()
    assert summary["maxRSS"] > 0 and summary["cpuConsumptionTime"] >= 0
    assert monitor.connections_report() == ""
