"""The guard rails inside the event-service executor, with the real toy payload: a breach
kills the payload's tree, fails the ranges it held with the breach's code, and a new
payload takes the next ranges (or, past the job's walltime, the executor gives up)."""

from __future__ import annotations

import sys
from pathlib import Path

import psutil
import pytest

from pilot.config import PilotConfig
from pilot.errors import ErrorCode
from pilot.eventservice.executor import EventExecutor
from pilot.eventservice.model import RangeStatus
from pilot.job import EventRange, Job
from pilot.payload.guard import Guard
from tests.conftest import REPO
from tests.payloads.orphan import survivors

ORPHAN = str(REPO / "tests" / "payloads" / "orphan.py")
COMMAND_ARGS = (
    " --start {startEvent} --last {lastEvent} --lfn {LFN} --guid {GUID}"
    " --output {outputFile} --range-id {eventRangeID}"
)


def make_job(pars: str, **extra: str) -> Job:
    return Job.from_panda(
        {
            "PandaID": 7,
            "taskID": 3,
            "jobsetID": 2,
            "transformation": sys.executable,
            "jobPars": pars,
            "eventService": "True",
            **extra,
        }
    )


def ranges(n: int) -> list[EventRange]:
    return [EventRange(f"3-7-1-{i}-0", i * 10 + 1, i * 10 + 10, "EVNT.root", "g") for i in range(n)]


def drive(ex, rs: list[EventRange], rounds: int = 300) -> dict:
    ex.start()
    ex.add_ranges(rs)
    ex.no_more_ranges()
    results = []
    for _ in range(rounds):
        results += ex.poll(0.5)
        if ex.finished or ex.error is not None:
            break
    results += ex.poll(0.0)
    out = {r.event_range_id: r for r in results}
    assert len(out) == len(results), "a range was reported twice"
    return out


def executor(job: Job, tmp_path: Path, **config: object) -> EventExecutor:
    cfg = PilotConfig(workdir=tmp_path, monitor_interval=0.2, kill_grace=1.0, **config)  # type: ignore[arg-type]
    guard = Guard(job, tmp_path / "w", cfg)
    return EventExecutor(
        job, tmp_path / "w", output_dir=tmp_path / "out", env=guard.environment(), guard=guard
    )


def test_memory_hog_fails_its_range_with_1235_and_the_next_ranges_finish(tmp_path):
    marker = f"hog-{tmp_path.name}"
    job = make_job(f"{ORPHAN} {marker} -m pilot.payloads.toysim --hog-on-event 15")
    ex = executor(job, tmp_path, queue={"maxrss": "100"})
    got = drive(ex, ranges(4))
    assert ex.error is None and ex.restarts == 1
    assert got["3-7-1-1-0"].status is RangeStatus.FAILED
    assert got["3-7-1-1-0"].error_code == ErrorCode.PAYLOADEXCEEDMAXMEM
    assert [got[f"3-7-1-{i}-0"].status for i in (0, 2, 3)] == [RangeStatus.FINISHED] * 3
    assert "1235 PAYLOADEXCEEDMAXMEM" in (tmp_path / "w" / "monitor_evidence.txt").read_text()
    ex.stop(1.0)
    assert survivors(marker) == []  # the orphan of each of the two payload processes


def test_hung_payload_is_looping_1150_and_waiting_for_ranges_is_not(tmp_path):
    job = make_job("-m pilot.payloads.toysim --hang-on-event 5")
    ex = executor(job, tmp_path, queue={"looping_limit": "2"})
    ex.start()
    # no range for longer than the looping limit: the payload waits on us, it is not stuck
    assert ex.poll(3.0) == [] and ex.error is None and ex.restarts == 0
    got = drive(ex, ranges(3))
    assert got["3-7-1-0-0"].error_code == ErrorCode.LOOPINGJOB
    assert got["3-7-1-1-0"].status is got["3-7-1-2-0"].status is RangeStatus.FINISHED
    assert ex.restarts == 1 and ex.error is None
    assert ex.payload.poll() is not None  # the restarted payload ended after the last range
    assert _payload_children("--hang-on-event") == []  # start() twice started one payload


def _payload_children(text: str) -> list[int]:
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if text in " ".join(p.cmdline()) and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p.pid)
        except psutil.Error:
            continue
    return found


def test_past_the_jobs_walltime_the_range_fails_with_1213_and_the_executor_gives_up(tmp_path):
    job = make_job("-m pilot.payloads.toysim --hang-on-event 15", maxWalltime="3")
    ex = executor(job, tmp_path)
    got = drive(ex, ranges(4))
    assert got["3-7-1-0-0"].status is RangeStatus.FINISHED
    assert got["3-7-1-1-0"].error_code == ErrorCode.REACHEDMAXTIME
    assert ex.error is not None and ex.error.code == ErrorCode.REACHEDMAXTIME
    assert ex.wanted() == 0
    left = ex.stop(1.0)
    assert {r.event_range_id for r in left} <= {"3-7-1-2-0", "3-7-1-3-0"}


def test_per_range_command_mode_is_guarded_too(tmp_path):
    job = make_job("-m pilot.payloads.toysim --hog-on-event 15" + COMMAND_ARGS)
    ex = executor(job, tmp_path, queue={"maxrss": "100"})
    got = drive(ex, ranges(3))
    assert got["3-7-1-1-0"].error_code == ErrorCode.PAYLOADEXCEEDMAXMEM
    assert got["3-7-1-0-0"].status is got["3-7-1-2-0"].status is RangeStatus.FINISHED


@pytest.mark.parametrize("mode", ["protocol", "command"])
def test_no_process_of_any_payload_is_left_after_the_ranges(tmp_path, mode):
    marker = f"{mode}-{tmp_path.name}"
    pars = f"{ORPHAN} {marker} -m pilot.payloads.toysim"
    ex = EventExecutor(make_job(pars + (COMMAND_ARGS if mode == "command" else "")), tmp_path)
    got = drive(ex, ranges(3))
    assert {r.status for r in got.values()} == {RangeStatus.FINISHED}
    assert survivors(marker) == []  # before stop(): each payload's end took its orphans
