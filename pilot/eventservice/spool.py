"""Range results kept on disk until the upstream has taken them.

A range is reported once and only once, and a result is never lost because
PanDA or Harvester was unreachable at the moment. Results are therefore
appended to a journal (one JSON record a line, fsynced per batch) before
anything is sent; a delivery appends the ids the upstream accepted. Replaying
the journal gives what is still pending, so a pilot restarted in the same
work directory (or ``pilot status --flush``) sends exactly the rest.

Journal records: ``{"op": "result", ...RangeResult.to_dict()}``,
``{"op": "delivered", "ids": [...]}``, ``{"op": "rejected", "ids": [...]}``
(the upstream answered False: resending would not change its mind), and in
zip mode ``{"op": "zip", "lfn", "path", "adler32", "fsize", "ids"}``. A torn
last line from a crash mid-append is skipped.

Zip mode (``updateEventRanges`` version 1): finished outputs waiting to be
reported are packed into one uncompressed zip per report
(:meth:`ResultSpool.zip_pending`), journaled, and reported as
``{"zipFile": {lfn, adler32, fsize, objstoreID}, "eventRanges": [{eventRangeID,
eventStatus}, ...]}``; failed and fatal ranges go in a group without
``zipFile``. A resend after a restart reuses the journaled zip, so a range is
never in two zips.
"""

from __future__ import annotations

import json
import logging
import os
import zipfile
from pathlib import Path
from typing import Any, Protocol

from pilot.errors import ErrorCode, PilotError
from pilot.eventservice.model import RangeResult, RangeStatus
from pilot.eventservice.outputs import adler32_of

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
        self.zips: list[dict[str, Any]] = []
        self._zip_of: dict[str, int] = {}
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
                elif op == "zip":
                    self._register_zip(rec)
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

    def _register_zip(self, rec: dict[str, Any]) -> None:
        self.zips.append(rec)
        for rid in rec["ids"]:
            self._zip_of[rid] = len(self.zips) - 1

    def zip_pending(self, directory: Path, lfn: str) -> dict[str, Any] | None:
        """Pack the pending finished outputs not zipped yet into ``directory/lfn``; its record."""
        members = [
            r
            for r in self.pending()
            if r.status is RangeStatus.FINISHED
            and r.output_path
            and r.event_range_id not in self._zip_of
        ]
        if not members:
            return None
        path = Path(directory) / lfn
        tmp = path.with_name(f".{path.name}.part")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
                names: set[str] = set()
                for r in members:
                    name = os.path.basename(r.output_path)
                    if name in names:
                        name = f"{r.event_range_id}.{name}"
                    names.add(name)
                    zf.write(r.output_path, name)
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise PilotError(ErrorCode.FILEHANDLINGFAILURE, f"cannot write {path}: {exc}") from None
        rec = {
            "lfn": lfn,
            "path": str(path),
            "adler32": adler32_of(path),
            "fsize": path.stat().st_size,
            "ids": [r.event_range_id for r in members],
        }
        self._append([{"op": "zip", **rec}])
        self._register_zip(rec)
        return rec

    def _v1_groups(
        self, todo: list[RangeResult], objstore_id: int | None
    ) -> tuple[list[dict[str, Any]], list[RangeResult]]:
        """v1 groups for ``todo`` and the results in the order the server answers them."""
        by_zip: dict[int, list[RangeResult]] = {}
        loose: list[RangeResult] = []
        for r in todo:
            if r.event_range_id in self._zip_of:
                by_zip.setdefault(self._zip_of[r.event_range_id], []).append(r)
            else:
                loose.append(r)
        groups, order = [], []
        for index, members in by_zip.items():
            z = self.zips[index]
            info: dict[str, Any] = {"lfn": z["lfn"], "adler32": z["adler32"], "fsize": z["fsize"]}
            if objstore_id is not None:
                info["objstoreID"] = objstore_id
            groups.append(
                {
                    "zipFile": info,
                    "eventRanges": [
                        {"eventRangeID": r.event_range_id, "eventStatus": r.status.value}
                        for r in members
                    ],
                }
            )
            order += members
        if loose:
            groups.append({"eventRanges": [r.to_panda_v0() for r in loose]})
            order += loose
        return groups, order

    def flush(
        self, reporter: Any, batch_size: int = 100, version: int = 0, objstore_id: int | None = None
    ) -> int:
        """Send pending results in batches; the number delivered. PilotError when the upstream fails."""
        sent = 0
        if version == 1 and not callable(getattr(reporter, "report_results", None)):
            groups, order = self._v1_groups(self.pending(), objstore_id)
            if not groups:
                return 0
            answers = reporter.update_event_ranges(groups, version=1)
            if not isinstance(answers, list) or len(answers) != len(order):
                raise PilotError(
                    ErrorCode.COMMUNICATIONFAILURE,
                    f"upstream answered {answers!r:.80} for {len(order)} ranges",
                )
            self._settle(order, [bool(a) for a in answers])
            return sum(1 for a in answers if a)
        todo = self.pending()
        for i in range(0, len(todo), max(1, batch_size)):
            chunk = todo[i : i + batch_size]
            answers = deliver(reporter, chunk)
            self._settle(chunk, answers)
            sent += sum(1 for a in answers if a)
        return sent

    def _settle(self, results: list[RangeResult], answers: list[bool]) -> None:
        ok = [r.event_range_id for r, a in zip(results, answers) if a]
        refused = [r.event_range_id for r, a in zip(results, answers) if not a]
        self._mark("delivered", ok)
        if refused:
            log.warning("upstream refused %d range updates, e.g. %s", len(refused), refused[0])
            self._mark("rejected", refused)
