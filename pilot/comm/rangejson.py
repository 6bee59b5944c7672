"""Decoding getEventRanges answers, the largest JSON a pilot reads again and again.

A Yoda fetches thousands of ranges per call, all the time; the standard
library spends most of the upstream link's CPU building their dicts. orjson
builds them about 1.7 times faster. It reads the same documents the same
way with one exception: an integer beyond 64 bits becomes a float. A range's
numbers are checked after decoding (``yoda.intake``, ``EventRange.from_panda``)
and must be integers below 2**63, so such a range is refused either way. What
orjson refuses outright (NaN, a lone surrogate, another encoding) is handed
to :mod:`json`, whose verdict stands. Other answers keep the standard library.
"""

from __future__ import annotations

import json
from typing import Any

try:
    import orjson
except ImportError:  # no wheel for this platform: the standard library alone
    orjson = None  # type: ignore[assignment]


def loads(data: str | bytes | bytearray) -> Any:
    """Decode a getEventRanges answer (or its ``eventRanges`` string)."""
    if orjson is not None:
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass
    return json.loads(data)
