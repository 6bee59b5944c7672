"""EventExecutor with the real toy payload: protocol and per-range command modes."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from pilot.errors import ErrorCode
from pilot.eventservice.command import CommandExecutor
from pilot.eventservice.executor import EventExecutor
from pilot.eventservice.model import RangeStatus
from pilot.eventservice.outputs import adler32_of
from pilot.job import EventRange, Job

TOYSIM = "-m pilot.payloads.toysim"
COMMAND_ARGS = (
    " --start {startEvent} --last {lastEvent} --lfn {LFN} --guid {GUID}"
    " --output {outputFile} --range-id {eventRangeID}"
)


def make_job(pars: str, transformation: str = sys.executable) -> Job:
    return Job.from_panda(
        {
            "PandaID": 7,
            "taskID": 3,
            "jobsetID": 2,
            "transformation": transformation,
            "jobPars": pars,
            "eventService": "True",
        }
    )


def make_ranges(n: int, first: int = 0) -> list[EventRange]:
    return [
        EventRange(f"3-7-1-{i}-0", i * 10 + 1, i * 10 + 10, "EVNT.root", "guid-1")
        for i in range(first, first + n)
    ]


def drive(ex: EventExecutor, ranges: list[EventRange], rounds: int = 400) -> list:
    ex.start()
    ex.add_ranges(ranges)
    ex.no_more_ranges()
    results = []
    for _ in range(rounds):
        results += ex.poll(1.0)
        if ex.finished or ex.error is not None:
            break
    return results


def by_id(results) -> dict:
    out = {r.event_range_id: r for r in results}
    assert len(out) == len(results), "a range was reported twice"
    return out


@pytest.mark.parametrize("mode", ["protocol", "command"])
def test_all_ranges_finish_with_checked_outputs(tmp_path, mode):
    pars = TOYSIM + (COMMAND_ARGS if mode == "command" else "")
    ex = EventExecutor(make_job(pars), tmp_path / "w", output_dir=tmp_path / "out")
    assert isinstance(ex, CommandExecutor) == (mode == "command")
    results = by_id(drive(ex, make_ranges(12)))
    assert ex.finished and ex.error is None
    assert len(results) == 12
    for r in results.values():
        assert r.status is RangeStatus.FINISHED
        path = Path(r.output_path)
        assert path.parent == tmp_path / "out"
        assert path.stat().st_size == r.fsize and adler32_of(path) == r.adler32
    assert ex.in_flight() == [] and ex.wanted() == 0
    assert ex.payload is not None and ex.payload.poll() is not None


def test_same_range_gives_same_checksum_in_both_modes(tmp_path):
    a = drive(EventExecutor(make_job(TOYSIM), tmp_path / "a"), make_ranges(2))
    b = drive(EventExecutor(make_job(TOYSIM + COMMAND_ARGS), tmp_path / "b"), make_ranges(2))
    assert sorted(r.adler32 for r in a) == sorted(r.adler32 for r in b)


def test_failures_crashes_and_segfaults(tmp_path):
    pars = (
        f"{TOYSIM} --fail-on-event 15 --fatal-on-event 25 --segfault-on-event 45"
        " --crash-on-range-substring 3-7-1-6-0"
    )
    ex = EventExecutor(make_job(pars), tmp_path, max_restarts=3)
    results = by_id(drive(ex, make_ranges(10)))
    assert ex.finished and ex.error is None and ex.restarts == 2
    assert len(results) == 10
    bad = {rid: r for rid, r in results.items() if r.status is not RangeStatus.FINISHED}
    assert set(bad) == {"3-7-1-1-0", "3-7-1-2-0", "3-7-1-4-0", "3-7-1-6-0"}
    assert bad["3-7-1-1-0"].status is RangeStatus.FAILED and bad["3-7-1-1-0"].error_code == 1224
    assert bad["3-7-1-2-0"].status is RangeStatus.FATAL and bad["3-7-1-2-0"].error_code == 1228
    assert "SIGSEGV" in bad["3-7-1-4-0"].error_diag and bad["3-7-1-4-0"].error_code == 1224
    assert "exit code 3" in bad["3-7-1-6-0"].error_diag
    assert all(len(r.error_diag) <= 256 for r in bad.values())


def test_restarts_are_bounded_and_the_rest_is_released(tmp_path):
    ex = EventExecutor(
        make_job(f"{TOYSIM} --crash-on-range-substring 3-7-1"), tmp_path, max_restarts=2
    )
    results = drive(ex, make_ranges(6))
    assert ex.error is not None and not ex.finished
    assert len(results) == 3 and all(r.status is RangeStatus.FAILED for r in results)
    released = ex.stop(grace=1.0)
    assert [r.event_range_id for r in released] == ["3-7-1-3-0", "3-7-1-4-0", "3-7-1-5-0"]


def test_hung_range_is_failed_and_the_payload_restarted(tmp_path):
    ex = EventExecutor(make_job(f"{TOYSIM} --hang-on-event 25"), tmp_path, range_timeout=1.0)
    results = by_id(drive(ex, make_ranges(4)))
    assert ex.finished and ex.restarts == 1
    assert results["3-7-1-2-0"].status is RangeStatus.FAILED
    assert results["3-7-1-2-0"].error_code == ErrorCode.LEASETIME
    assert "payload killed: no report of a range for 1 s" in results["3-7-1-2-0"].error_diag
    assert sum(r.status is RangeStatus.FINISHED for r in results.values()) == 3


def test_stop_kills_the_payload_and_returns_unfinished_ranges(tmp_path):
    ex = EventExecutor(make_job(f"{TOYSIM} --hang-on-event 1"), tmp_path)
    ex.start()
    ex.add_ranges(make_ranges(3))
    for _ in range(50):
        ex.poll(0.2)
        if ex.in_flight():
            break
    assert ex.in_flight() == ["3-7-1-0-0"]
    released = ex.stop(grace=1.0)
    assert [r.event_range_id for r in released] == ["3-7-1-0-0", "3-7-1-1-0", "3-7-1-2-0"]
    assert ex.payload.poll() is not None


def test_wanted_and_duplicate_ranges(tmp_path):
    ex = EventExecutor(make_job(TOYSIM), tmp_path, prefetch=4)
    assert ex.wanted() == 4
    ex.add_ranges(make_ranges(3))
    ex.add_ranges(make_ranges(1))  # the same range again: ignored
    assert ex.wanted() == 1
    ex.no_more_ranges()
    assert ex.wanted() == 0
    ex.stop(grace=0.1)


ROGUE = textwrap.dedent(
    """
    import json, re, sys, zmq
    name = re.search(r'EventRangeChannel="([^"]+)"', " ".join(sys.argv)).group(1)
    s = zmq.Context().socket(zmq.DEALER); s.connect("ipc:///tmp/zmq_" + name)
    s.send(b"Ready for events")
    rid = json.loads(s.recv())[0]["eventRangeID"]
    s.send(b"complete nonsense")
    s.send(b"\\xff\\xfe garbage")
    s.send(b"x" * (2 << 20))
    s.send_multipart([b"two", b"frames"])
    s.send(b"/tmp/x,ID:9-9-9-9-9,CPU:1,WALL:1")
    s.send(b"ERR_TE_FATAL 9-9-9-9-8: not mine")
    open("out.dat", "w").write("data")
    s.send(("out.dat,ID:%s,CPU:1,WALL:1" % rid).encode())
    s.send(("out.dat,ID:%s,CPU:1,WALL:1" % rid).encode())
    s.send(b"Ready for events")
    rng = json.loads(s.recv())[0]
    s.send(("/etc/hostname,ID:%s,CPU:1,WALL:1" % rng["eventRangeID"]).encode())
    s.send(b"Ready for events")
    assert s.recv() == b"No more events"
    """
)


def test_rogue_payload_messages_are_dropped_not_fatal(tmp_path):
    script = tmp_path / "rogue.py"
    script.write_text(ROGUE)
    ex = EventExecutor(make_job(str(script)), tmp_path / "w")
    results = by_id(drive(ex, make_ranges(2)))
    assert ex.finished and ex.error is None
    assert results["3-7-1-0-0"].status is RangeStatus.FINISHED
    assert results["3-7-1-1-0"].status is RangeStatus.FAILED
    assert results["3-7-1-1-0"].error_code == ErrorCode.BADOUTPUTFILENAME
    # nonsense, not UTF-8, 2 MiB, two frames, two unknown ranges, one report twice
    assert ex.bad_messages == 7


def test_command_mode_failures(tmp_path):
    pars = TOYSIM + COMMAND_ARGS + " --fail-on-event 15 --segfault-on-event 25 --fatal-on-event 35"
    results = by_id(drive(EventExecutor(make_job(pars), tmp_path), make_ranges(5)))
    assert results["3-7-1-0-0"].status is RangeStatus.FINISHED
    assert (
        results["3-7-1-1-0"].error_code == 1224
        and "ERR_ATHENAMP_PROCESS" in results["3-7-1-1-0"].error_diag
    )
    assert results["3-7-1-2-0"].error_code == 1224 and "SIGSEGV" in results["3-7-1-2-0"].error_diag
    assert results["3-7-1-3-0"].status is RangeStatus.FATAL
    assert results["3-7-1-4-0"].status is RangeStatus.FINISHED


def test_command_mode_broken_command_stops_after_max_restarts(tmp_path):
    job = make_job("{eventRangeID}", transformation="/nonexistent/transform")
    ex = EventExecutor(job, tmp_path, max_restarts=1)
    results = drive(ex, make_ranges(5))
    assert ex.error is not None and len(results) == 2
    assert len(ex.stop(grace=0.1)) == 3


def test_payload_that_never_asks_for_events_is_given_up_with_1317(tmp_path):
    job = make_job("-c 'import time; time.sleep(60)'")
    ex = EventExecutor(job, tmp_path, max_restarts=1, ready_timeout=0.5, mode="protocol")
    results = drive(ex, make_ranges(2))
    assert results == [] and ex.error is not None and ex.restarts == 0
    assert ex.error.code == ErrorCode.EXCEEDEDMAXWAITTIME
    assert "did not ask for events within 0 s" in ex.error.detail
    assert ex.payload.poll() is not None
    assert len(ex.stop(grace=0.1)) == 2


def test_payload_that_exits_at_once_is_restarted_then_given_up(tmp_path):
    ex = EventExecutor(make_job("-c pass"), tmp_path, max_restarts=2)
    results = drive(ex, make_ranges(2))
    assert results == [] and ex.error is not None and ex.restarts == 2
    assert len(ex.stop(grace=0.1)) == 2


def test_toysim_as_athenamt_gets_pfn_and_reports_na_times(tmp_path):
    (tmp_path / "EVNT.root").write_text("input")
    ex = EventExecutor(make_job(f"{TOYSIM} --CA --multithreaded=true"), tmp_path)
    results = by_id(drive(ex, make_ranges(3)))
    assert ex.finished and ex.error is None
    assert "--athenaopts=' --mtes --mtes-channel=" in ex.payload_command
    assert all(r.status is RangeStatus.FINISHED for r in results.values())
    assert all(r.cpu == 0.0 and r.wall == 0.0 for r in results.values())  # CPU:N/A,WALL:N/A


def test_a_range_athenamp_would_split_fails_alone_with_a_clear_error(tmp_path):
    ranges = make_ranges(3)
    ranges[1] = EventRange("3-7-1-1-0", 11, 20, "EVNT.root", "guid,with,commas")
    results = by_id(drive(EventExecutor(make_job(TOYSIM), tmp_path), ranges))
    bad = results.pop("3-7-1-1-0")
    assert bad.status is RangeStatus.FAILED and bad.error_code == ErrorCode.ESRECOVERABLE
    assert "GUID" in bad.error_diag and "commas" in bad.error_diag
    assert all(r.status is RangeStatus.FINISHED for r in results.values())
