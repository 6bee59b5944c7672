"""The result journal: nothing lost, nothing sent twice."""

from __future__ import annotations

import pytest

from pilot.errors import ErrorCode, PilotError
from pilot.eventservice.model import RangeResult, RangeStatus
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
