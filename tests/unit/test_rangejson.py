"""getEventRanges answers decode as with the standard library (orjson when installed)."""

from __future__ import annotations

import json
import math

import pytest

from pilot.comm import rangejson
from yoda.intake import range_columns

ANSWERS = [
    '[{"eventRangeID": "9-501-77-1-1", "startEvent": 0, "lastEvent": 9, "LFN": "E.root",'
    ' "GUID": "G", "scope": "mc", "PFN": null}]',
    '{"StatusCode": 0, "eventRanges": "[]"}',
    '"caf\\u00e9 \\ud800"',  # a lone surrogate: orjson refuses, json decides
    '{"x": NaN}',
    "[1e400, -0.0, 12345678901234567890]",
]


@pytest.mark.parametrize("doc", ANSWERS)
def test_answers_decode_to_what_json_gives(doc):
    got, want = rangejson.loads(doc.encode()), json.loads(doc)
    if isinstance(want, dict) and "x" in want:
        assert math.isnan(got["x"])
    elif isinstance(want, list) and want and want[-1] == 12345678901234567890:
        assert got[:2] == want[:2]  # beyond 64 bits: see the next test
    else:
        assert got == want


@pytest.mark.parametrize("bad", [b'[{"a": 1}', b"", b"\xff[]"])
def test_what_json_refuses_is_refused(bad):
    with pytest.raises(ValueError):
        rangejson.loads(bad)


def test_a_range_number_beyond_64_bits_is_refused_however_it_decoded():
    doc = (
        b'[{"eventRangeID": "9-501-77-1-1", "startEvent": 0, "lastEvent": 9,'
        b' "LFN": "E.root", "GUID": "G", "scope": "mc"},'
        b' {"eventRangeID": "9-501-77-2-1", "startEvent": 0,'
        b' "lastEvent": 100000000000000000000000000000, "LFN": "E.root", "GUID": "G", "scope": "mc"}]'
    )
    for items in (rangejson.loads(doc), json.loads(doc)):
        intake = range_columns(items, 501)
        assert len(intake.cols) == 1 and len(intake.errors) == 1
        assert intake.cols["proc"].tolist() == [1]


def test_without_orjson_the_standard_library_decodes(monkeypatch):
    monkeypatch.setattr(rangejson, "orjson", None)
    doc = b'[{"eventRangeID": "9-501-77-1-1", "startEvent": 0, "lastEvent": 1}]'
    assert rangejson.loads(doc) == json.loads(doc)
    with pytest.raises(ValueError):
        rangejson.loads(b"[")
