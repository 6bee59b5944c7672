"""The result journal: nothing lost, nothing sent twice."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from pilot.errors import ErrorCode, PilotError
from pilot.eventservice.model import RangeResult, RangeStatus
from pilot.eventservice.outputs import adler32_of
from pilot.eventservice.spool import ResultSpool


class Upstream:
    def __init__(self, down: int = 0, refuse: tuple[str, ...] = ()) -> None:
        self.down = down
        self.refuse = refuse
        self.entries: list[dict] = []

    def update_event_ranges(self, entries, version=0):
        assert version == 0
        if self.down:
            self.down -= 1
            raise PilotError(ErrorCode.COMMUNICATIONFAILURE, "server down")
        self.entries += entries
        return [e["eventRangeID"] not in self.refuse for e in entries]


def results(n: int) -> list[RangeResult]:
    return [RangeResult(f"1-2-3-{i}-0", RangeStatus.FINISHED, cpu=1.0) for i in range(n)]


def test_results_survive_a_dead_upstream_and_a_restart(tmp_path):
    path = tmp_path / "spool.jsonl"
    spool = ResultSpool(path)
    assert len(spool.add(results(5))) == 5
    up = Upstream(down=1)
    with pytest.raises(PilotError):
        spool.flush(up)
    assert spool.n_pending == 5
    again = ResultSpool(path)  # a new pilot in the same directory
    assert again.n_pending == 5
    assert again.flush(up, batch_size=2) == 5
    assert [e["eventRangeID"] for e in up.entries] == [f"1-2-3-{i}-0" for i in range(5)]
    assert ResultSpool(path).n_pending == 0
    assert ResultSpool(path).flush(up) == 0
    assert len(up.entries) == 5


def test_duplicates_are_dropped_and_refusals_not_resent(tmp_path):
    spool = ResultSpool(tmp_path / "s")
    spool.add(results(3))
    assert spool.add(results(4)) == [results(4)[3]]
    up = Upstream(refuse=("1-2-3-1-0",))
    assert spool.flush(up) == 3
    assert spool.rejected == {"1-2-3-1-0"}
    assert spool.n_pending == 0


def test_torn_last_line_is_skipped(tmp_path):
    path = tmp_path / "s"
    spool = ResultSpool(path)
    spool.add(results(2))
    with open(path, "a") as fh:
        fh.write('{"op": "result", "event_range_id": "1-2-3-9')
    assert ResultSpool(path).n_pending == 2


def test_wrong_answer_length_keeps_results_pending(tmp_path):
    class Short:
        def update_event_ranges(self, entries, version=0):
            return [True]

    spool = ResultSpool(tmp_path / "s")
    spool.add(results(2))
    with pytest.raises(PilotError) as err:
        spool.flush(Short())
    assert err.value.code == ErrorCode.COMMUNICATIONFAILURE
    assert spool.n_pending == 2


class V1Upstream:
    def __init__(self, down: int = 0) -> None:
        self.down = down
        self.calls: list[list[dict]] = []

    def update_event_ranges(self, entries, version=0):
        assert version == 1
        if self.down:
            self.down -= 1
            raise PilotError(ErrorCode.COMMUNICATIONFAILURE, "server down")
        self.calls.append(entries)
        return [True for group in entries for _ in group["eventRanges"]]


def test_zip_mode_packs_outputs_once_and_reuses_the_zip_on_resend(tmp_path):
    spool_path = tmp_path / "spool.jsonl"
    spool = ResultSpool(spool_path)
    outs = []
    for i in range(3):
        out = tmp_path / f"out{i}.dat"
        out.write_bytes(b"x" * (i + 1))
        outs.append(RangeResult(f"1-2-3-{i}-0", RangeStatus.FINISHED, str(out), i + 1, "0", 1.0))
    failed = RangeResult("1-2-3-9-0", RangeStatus.FAILED, error_code=1224, error_diag="boom")
    spool.add([*outs, failed])
    rec = spool.zip_pending(tmp_path / "zips", "premerge_1.zip")
    assert rec["ids"] == ["1-2-3-0-0", "1-2-3-1-0", "1-2-3-2-0"]
    with zipfile.ZipFile(rec["path"]) as zf:
        assert sorted(zf.namelist()) == ["out0.dat", "out1.dat", "out2.dat"]
    assert rec["adler32"] == adler32_of(Path(rec["path"]))
    assert spool.zip_pending(tmp_path / "zips", "premerge_2.zip") is None  # nothing new
    up = V1Upstream(down=1)
    with pytest.raises(PilotError):
        spool.flush(up, version=1, objstore_id=7)
    again = ResultSpool(spool_path)  # restart: the journaled zip is reused
    assert again.zip_pending(tmp_path / "zips", "premerge_2.zip") is None
    assert again.flush(up, version=1, objstore_id=7) == 4
    (groups,) = up.calls
    assert groups[0]["zipFile"] == {
        "lfn": "premerge_1.zip",
        "adler32": rec["adler32"],
        "fsize": rec["fsize"],
        "objstoreID": 7,
    }
    assert [e["eventStatus"] for e in groups[0]["eventRanges"]] == ["finished"] * 3
    assert groups[1] == {"eventRanges": [failed.to_panda_v0()]}
    assert again.n_pending == 0 and ResultSpool(spool_path).n_pending == 0
