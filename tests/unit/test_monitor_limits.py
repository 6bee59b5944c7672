"""Limits from the job and the queue description."""

from __future__ import annotations

import pytest

from pilot.errors import ErrorCode, PilotError
from pilot.job import Job
from pilot.monitor.limits import FREE_SPACE_DEFAULT_MB, LOOPING_DEFAULT_S, Limits


def job(**extra: str) -> Job:
    return Job.from_panda({"PandaID": "1", "transformation": "run.sh", **extra})


def test_from_job_only() -> None:
    lim = Limits.from_job(
        job(minRamCount="2000", maxWalltime="3600", maxDiskCount="5000", maxCpuCount="100")
    )
    assert lim.memory_kb == 2000 * 2 * 1024
    assert lim.walltime_s == 3600
    assert lim.workdir_max_mb == 5000
    assert lim.looping_s == LOOPING_DEFAULT_S
    assert lim.min_free_space_mb == FREE_SPACE_DEFAULT_MB


def test_queue_takes_part() -> None:
    lim = Limits.from_job(
        job(minRamCount="1000", maxWalltime="7200", maxCpuCount="90000"),
        {"maxrss": "16000", "maxtime": "3600", "maxwdir": "20000", "looping_limit": ""},
    )
    assert lim.memory_kb == 16000 * 1024  # the queue's cap is larger than 2x the request
    assert lim.walltime_s == 3600  # the slot ends first
    assert lim.workdir_max_mb == 20000
    assert lim.looping_s == 90000  # maxCpuCount beats the 2 h default


def test_no_job_no_queue_has_only_defaults() -> None:
    lim = Limits.from_job()
    assert lim.memory_kb == 0 and lim.walltime_s == 0 and lim.workdir_max_mb == 0
    assert "memory=none" in lim.describe()


def test_scale_for_tests() -> None:
    lim = Limits.from_job(job(maxWalltime="3600"), scale=0.001)
    assert lim.walltime_s == pytest.approx(3.6)
    assert lim.looping_s == pytest.approx(7.2)
    with pytest.raises(PilotError):
        lim.scaled(0)


@pytest.mark.parametrize("bad", ["lots", "-1", True])
def test_bad_queue_values(bad: object) -> None:
    with pytest.raises(PilotError) as err:
        Limits.from_job(job(), {"maxrss": bad})
    assert err.value.code == ErrorCode.BADQUEUECONFIGURATION
