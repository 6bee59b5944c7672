"""Range results kept on disk until the upstream has taken them.

A range is reported once and only once, and a result is never lost because
PanDA or Harvester was unreachable at the moment. Results are therefore
appended to a journal (one JSON record a line, fsynced per batch) before
anything is sent; a delivery appends the ids the upstream accepted. Replaying
the journal gives what is still pending, so a pilot restarted in the same
work directory (or ``pilot status --flush``) sends exactly the rest.

Journal records: ``{"op": "result", ...RangeResult.to_dict()}``,
``{"op": "delivered", "ids": [...]}``, ``{"op": "rejected", "ids": [...]}``
(the upstream answered False: resending would not change its mind). A torn
last line from a crash mid-append is skipped.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Protocol

from pilot.errors import ErrorCode, PilotError
from pilot.eventservice.model import RangeResult

log = logging.getLogger(__name__)

SPOOL_NAME = "es_results.jsonl"


class RangeUpdater(Protocol):
    """Anything that takes ``updateEventRanges`` v0 entries (PanDA client, Harvester source)."""

    def update_event_ranges(
        self, entries: list[dict[str, Any]], version: int = 0
    ) -> list[bool]: ...


def deliver(reporter: Any, results: list[RangeResult]) -> list[bool]:
    """Send results; an upstream with ``report_results`` (Harvester) gets the outputs too."""
    report_results = getattr(reporter, "report_results", None)
    if callable(report_results):
        answers = report_results(results)
    else:
        answers = reporter.update_event_ranges([r.to_panda_v0() for r in results], version=0)
    if not isinstance(answers, list) or len(answers) != len(results):
        raise PilotError(
            ErrorCode.COMMUNICATIONFAILURE,
            f"upstream answered {len(answers) if isinstance(answers, list) else answers!r} "
            f"for {len(results)} ranges",
        )
    return [bool(a) for a in answers]


class ResultSpool:
    """The journal of range results and what became of them upstream."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._results: dict[str, RangeResult] = {}
        self._pending: dict[str, None] = {}  # insertion-ordered set
        self.delivered: set[str] = set()
        self.rejected: set[str] = set()
        self._load()

    def _load(self) -> None:
        try:
            lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise PilotError(
                ErrorCode.FILEHANDLINGFAILURE, f"cannot read {self.path}: {exc}"
            ) from None
        for n, line in enumerate(lines, 1):
            try:
                rec = json.loads(line)
                op = rec.pop("op")
                if op == "result":
                    result = RangeResult.from_dict(rec)
                    if result.event_range_id not in self._results:
                        self._results[result.event_range_id] = result
                        self._pending[result.event_range_id] = None
                elif op in ("delivered", "rejected"):
                    for rid in rec["ids"]:
                        self._pending.pop(rid, None)
                        (self.delivered if op == "delivered" else self.rejected).add(rid)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
                log.warning("%s line %d unreadable, skipped: %s", self.path, n, exc)

    def _append(self, records: list[dict[str, Any]]) -> None:
        data = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            raise PilotError(
                ErrorCode.FILEHANDLINGFAILURE, f"cannot append to {self.path}: {exc}"
            ) from None

    def add(self, results: list[RangeResult]) -> list[RangeResult]:
        """Journal new results; a second result for a range already known is dropped."""
        new = []
        for r in results:
            if r.event_range_id in self._results:
                log.warning(
                    "range %s already has a result: the new one is dropped", r.event_range_id
                )
                continue
            new.append(r)
        if new:
            self._append([{"op": "result", **r.to_dict()} for r in new])
            for r in new:
                self._results[r.event_range_id] = r
                self._pending[r.event_range_id] = None
        return new

    def pending(self) -> list[RangeResult]:
        return [self._results[rid] for rid in self._pending]

    @property
    def n_pending(self) -> int:
        return len(self._pending)

    def results(self) -> list[RangeResult]:
        return list(self._results.values())

    def _mark(self, op: str, ids: list[str]) -> None:
        if not ids:
            return
        self._append([{"op": op, "ids": ids}])
        for rid in ids:
            self._pending.pop(rid, None)
        (self.delivered if op == "delivered" else self.rejected).update(ids)

    def flush(self, reporter: Any, batch_size: int = 100) -> int:
        """Send pending results in batches; the number delivered. PilotError when the upstream fails."""
        sent = 0
        todo = self.pending()
        for i in range(0, len(todo), max(1, batch_size)):
            chunk = todo[i : i + batch_size]
            answers = deliver(reporter, chunk)
            ok = [r.event_range_id for r, a in zip(chunk, answers) if a]
            refused = [r.event_range_id for r, a in zip(chunk, answers) if not a]
            self._mark("delivered", ok)
            if refused:
                log.warning("upstream refused %d range updates, e.g. %s", len(refused), refused[0])
                self._mark("rejected", refused)
            sent += len(ok)
        return sent
