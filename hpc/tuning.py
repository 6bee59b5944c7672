"""Process settings for the ranks' long-running loops (and rank 0's upstream link)."""

from __future__ import annotations

import gc


def tune_gc() -> None:
    """Fewer garbage-collector passes for a rank's long loop.

    Rank 0 turns every upstream answer into thousands of short-lived dicts and
    tuples; with the default threshold (a young-generation pass every 700
    allocations) the collector took a tenth of its CPU. What exists at start
    (modules, configuration) is frozen out of every pass, and young passes run
    every 20,000 allocations: the loop's own garbage has no cycles to find."""
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
