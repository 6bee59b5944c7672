"""When to try an upstream call again after it failed.

A loop that must not block on a dead upstream (the event-service loop, Yoda)
keeps one :class:`RetryBackoff` per call: it says whether the call is due,
and doubles the wait after each failure up to a maximum, so a server that
is down is asked less and less often and a server that is back is used at
once.
"""

from __future__ import annotations


class RetryBackoff:
    """Exponential retry schedule, driven by the caller's clock."""

    def __init__(self, first: float = 1.0, maximum: float = 60.0) -> None:
        self.first = first
        self.maximum = maximum
        self.delay = first
        self.next_at = 0.0
        self.failures = 0

    def ready(self, now: float) -> bool:
        return now >= self.next_at

    def failed(self, now: float) -> float:
        """Record a failure at ``now``; returns the wait before the next try."""
        wait = self.delay
        self.failures += 1
        self.next_at = now + wait
        self.delay = min(self.maximum, self.delay * 2)
        return wait

    def ok(self) -> None:
        self.failures = 0
        self.delay = self.first
        self.next_at = 0.0
