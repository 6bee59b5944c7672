"""The toy payload: deterministic outputs, command mode and injected failures."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pilot.eventservice.channelname import with_channel
from pilot.payloads import toysim


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pilot.payloads.toysim", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_simulation_is_deterministic_per_event_and_guid():
    a, na = toysim.simulate_event(42, "guid-a")
    b, nb = toysim.simulate_event(42, "guid-a")
    c, _ = toysim.simulate_event(42, "guid-b")
    assert np.array_equal(a, b) and na == nb
    assert not np.array_equal(a, c)
    assert a.shape == (toysim.LAYERS, toysim.ETA_BINS) and a.sum() > 0


def test_output_bytes_are_reproducible(tmp_path):
    arrays = toysim.simulate_range(1, 10, "g", 0.0)
    header = {"eventRangeID": "1-2-3-4-5"}
    toysim.write_output(tmp_path / "a", header, arrays)
    toysim.write_output(tmp_path / "b", header, toysim.simulate_range(1, 10, "g", 0.0))
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()
    meta, back = toysim.read_output(tmp_path / "a")
    assert meta["eventRangeID"] == "1-2-3-4-5"
    assert list(back["events"]) == list(range(1, 11))
    assert np.allclose(back["histogram"], arrays["histogram"])


def test_command_mode_writes_output_and_prints_done_line(tmp_path):
    out = tmp_path / "sub" / "o.dat"
    args = ["--start", "1", "--last", "3", "--guid", "G", "--lfn", "in.root"]
    proc = _run([*args, "--output", str(out), "--range-id", "1-2-3-4-5"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith(f"{out.resolve()},ID:1-2-3-4-5,CPU:")
    assert ",WALL:" in line
    meta, arrays = toysim.read_output(out)
    assert meta["GUID"] == "G" and list(arrays["events"]) == [1, 2, 3]


def test_command_mode_injected_failure_is_an_err_line(tmp_path):
    args = ["--start", "1", "--last", "3", "--range-id", "1-2-3-4-5", "--fail-on-event", "2"]
    proc = _run(args, tmp_path)
    assert proc.returncode == toysim.EXIT_RANGE_FAILED
    assert proc.stderr.strip().startswith("ERR_ATHENAMP_PROCESS 1-2-3-4-5:")


def test_command_mode_segfault_is_a_real_signal(tmp_path):
    proc = _run(["--start", "1", "--last", "3", "--segfault-on-event", "1"], tmp_path)
    assert proc.returncode == -11


def _channel_of(command: str) -> str:
    """The channel toysim finds in the pilot's edit of ``command``."""
    args = toysim.parser().parse_args(shlex.split(command)[3:])
    return toysim.channel_from_options(args)


@pytest.mark.parametrize(
    "command",
    [
        "python -m pilot.payloads.toysim",
        "python -m pilot.payloads.toysim --CA",
        "python -m pilot.payloads.toysim --CA --multithreaded=true",
        "python -m pilot.payloads.toysim --CA --multithreaded=True --athenaopts='--threads=4'",
        "python -m pilot.payloads.toysim --preExec 'x = 1'",
        "python -m pilot.payloads.toysim --CA --preExec 'ConfigFlags.Exec.MaxEvents = 5'",
        "python -m pilot.payloads.toysim --preExec"
        " 'from AthenaMP.AthenaMPFlags import jobproperties as jps;jps.AthenaMPFlags.Foo=1'",
    ],
)
def test_channel_is_read_from_the_job_options_the_pilot_wrote(command):
    assert _channel_of(command) == "EventService_EventRanges"
    assert _channel_of(with_channel(command, "EventService_EventRanges_7_ab")) == (
        "EventService_EventRanges_7_ab"
    )


def test_channel_from_the_environment_when_the_command_reads_it(monkeypatch):
    monkeypatch.setenv("PILOT_EVENTRANGECHANNEL", "EventService_EventRanges_env")
    command = (
        "python -m pilot.payloads.toysim --preExec"
        " 'ConfigFlags.MP.EventRangeChannel=os.environ[\"PILOT_EVENTRANGECHANNEL\"]'"
    )
    assert _channel_of(command) == "EventService_EventRanges_env"


def test_ranges_are_read_as_athenamp_reads_them():
    text = '[{"eventRangeID": "1-2-3-4-5", "startEvent": 1, "lastEvent": 2, "PFN": "/d/f"}]'
    rng = toysim.parse_range_message(text, need_pfn=True)
    assert rng == {"eventRangeID": "1-2-3-4-5", "startEvent": 1, "lastEvent": 2, "PFN": "/d/f"}
    for bad in ("garbage", "[1, 2]", text + "\0", text.replace("/d/f", "/d,f")):
        assert toysim.parse_range_message(bad).startswith('ERR_ATHENAMP_PARSE "'), bad
    no_pfn = '[{"eventRangeID": "1-2-3-4-5", "startEvent": 1, "lastEvent": 2}]'
    assert isinstance(toysim.parse_range_message(no_pfn), dict)
    assert "Wrong format" in toysim.parse_range_message(no_pfn, need_pfn=True)
    backwards = '[{"eventRangeID": "1-2-3-4-5", "startEvent": 3, "lastEvent": 2}]'
    assert "Wrong values" in toysim.parse_range_message(backwards)
