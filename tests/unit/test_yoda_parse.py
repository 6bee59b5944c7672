"""The inline range validation agrees with EventRange.from_panda on every input."""

from __future__ import annotations

import numpy as np
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


def _columns_as_ranges(intake):
    from pilot.job import EventRange

    out = []
    for file_id, proc, attempt, start, last, fref in intake.cols.tolist():
        lfn, guid, scope, pfn = intake.files[fref]
        rid = f"77-1001-{file_id}-{proc}-{attempt}"
        out.append(EventRange(rid, start, last, lfn, guid, scope, pfn))
    return out


@pytest.mark.parametrize("case", CASES)
def test_bulk_columns_accept_what_from_panda_accepts(case):
    from yoda.intake import range_columns

    other = {**GOOD, "eventRangeID": "77-1001-5-4-1"}
    intake = range_columns([other, case], 1001)
    (want,) = parse_ranges([case])
    if isinstance(want, PilotError):
        assert [e.code for e in intake.errors] == [want.code]
        assert _columns_as_ranges(intake) == parse_ranges([other])
    else:
        assert not intake.errors
        assert _columns_as_ranges(intake) == parse_ranges([other, case])


def test_a_plain_batch_takes_the_bulk_path_and_drops_other_jobs():
    from yoda.intake import _bulk

    batch = [{**GOOD, "eventRangeID": f"77-1001-5-{i}-1"} for i in range(50)]
    batch.append({**GOOD, "eventRangeID": "77-2002-5-1-1"})
    intake = _bulk(batch, 1001)
    assert intake is not None and intake.foreign == ["77-2002-5-1-1"]
    assert intake.cols["proc"].tolist() == list(range(50)) and len(intake.files) == 1
    assert _bulk([*batch, {**GOOD, "startEvent": 10**30}], 1001) is None  # to the slow path


@pytest.mark.parametrize(
    "rid",
    [
        "1-2-3-4",
        "1-2-3-4-5-6",
        "1--2-3-4",
        "1-2-3-4-",
        "\uff11-2-3-4-5",  # a full-width digit
        "1-2-3-4-5\n1-2-3-4-5",
        "a-2-3-4-5",
        "1-2-3-4-1234567890123456789",  # 19 digits
        "1-2-03-4-5",  # the ledger would hand it back as 1-2-3-4-5
    ],
)
def test_range_ids_the_bulk_parser_leaves_to_the_slow_path(rid):
    from yoda.intake import _id_numbers, range_columns

    ids = ("77-1001-5-1-1", rid, "77-1001-5-2-1")
    assert _id_numbers(ids) is None
    assert _id_numbers((rid, rid)) is None  # ids of one length: the aligned byte matrix
    batch = [{**GOOD, "eventRangeID": r} for r in ids]
    intake = range_columns(batch, 1001)
    assert len(intake.cols) + len(intake.errors) + len(intake.foreign) == 3
    assert len(intake.cols) == 2 or rid == "1-2-3-4-1234567890123456789"


def test_the_bulk_parser_reads_the_numbers():
    from yoda.intake import _id_numbers

    ids = ("77-1001-5-1-1", "4242-7000000001-30000000001-999-65535", "0-0-0-0-0")
    assert _id_numbers(ids).tolist() == [[int(p) for p in r.split("-")] for r in ids]


def test_ids_of_one_length_are_read_as_a_byte_matrix_with_the_same_numbers():
    import random

    from yoda.intake import _aligned_numbers, _id_numbers

    rng = random.Random(7)
    for _ in range(200):
        widths = [rng.randint(1, 18) for _ in range(5)]
        ids = tuple(
            "-".join(
                str(rng.randint(10 ** (w - 1), 10**w - 1)) if w > 1 else str(rng.randint(0, 9))
                for w in widths
            )
            for _ in range(rng.randint(1, 40))
        )
        want = [[int(p) for p in r.split("-")] for r in ids]
        blob = np.frombuffer(("\n".join(ids) + "\n").encode(), np.uint8)
        assert _aligned_numbers(blob.reshape(len(ids), -1)).tolist() == want
        assert _id_numbers(ids).tolist() == want
    # the same length, dashes elsewhere: not a matrix, still read right
    ids = ("1-22-3-4-5", "11-2-3-4-5")
    blob = np.frombuffer(("\n".join(ids) + "\n").encode(), np.uint8)
    assert _aligned_numbers(blob.reshape(2, -1)) is None
    assert _id_numbers(ids).tolist() == [[1, 22, 3, 4, 5], [11, 2, 3, 4, 5]]
