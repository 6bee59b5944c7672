"""The toy payload: deterministic outputs, command mode and injected failures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

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


def test_no_channel_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv(toysim.CHANNEL_VARIABLE, raising=False)
    proc = _run([], tmp_path)
    assert proc.returncode == 2 and "no channel" in proc.stderr


def test_bad_range_message_gives_parse_error():
    assert toysim.parse_range_message("garbage").startswith("ERR_ATHENAMP_PARSE")
    assert toysim.parse_range_message("[1, 2]").startswith("ERR_ATHENAMP_PARSE")
    rng = toysim.parse_range_message('[{"eventRangeID": "1-2-3-4-5", "startEvent": 1}]')
    assert isinstance(rng, dict)
