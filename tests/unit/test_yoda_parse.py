"""The inline range validation agrees with EventRange.from_panda on every input."""

from __future__ import annotations

import pytest

from pilot.errors import PilotError
from pilot.job import EventRange
from yoda.intake import parse_ranges

GOOD = {
    "eventRangeID": "77-1001-5-3-1",
    "startEvent": 0,
    "lastEvent": 9,
    "LFN": "EVNT.01.pool.root",
    "GUID": "G-1",
    "scope": "mc23",
}
CASES = [
    GOOD,
    {**GOOD, "PFN": "/data/EVNT.01.pool.root"},
    {**GOOD, "GUID": "NULL", "scope": None},
    {**GOOD, "startEvent": "4", "lastEvent": "7"},
    {**GOOD, "startEvent": 5, "lastEvent": 4},
    {**GOOD, "startEvent": -1},
    {**GOOD, "startEvent": True},
    {**GOOD, "eventRangeID": "77-1001-5-3"},
    {**GOOD, "eventRangeID": 7},
    {**GOOD, "LFN": "../etc/passwd"},
    {**GOOD, "LFN": "a/b"},
    {**GOOD, "LFN": "a\\b"},
    {**GOOD, "LFN": "x\x00y"},
    {**GOOD, "LFN": "x" * 256},
    {**GOOD, "LFN": ""},
    {**GOOD, "LFN": "NULL"},
    {**GOOD, "LFN": ".."},
    {k: v for k, v in GOOD.items() if k != "LFN"},
    {**GOOD, "GUID": 12},
    "not a dict",
    None,
]


@pytest.mark.parametrize("case", CASES)
def test_same_verdict_and_object_as_from_panda(case):
    (got,) = parse_ranges([case])
    try:
        want = EventRange.from_panda(case)
    except PilotError as exc:
        assert isinstance(got, PilotError) and got.code == exc.code
    else:
        assert got == want
