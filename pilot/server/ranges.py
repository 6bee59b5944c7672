"""Event ranges in the dispatcher's store, with PanDA's server-side rules.

- ranges are dispatched per job attempt, each once, only while the job runs
  (not before it is dispatched, not after it was told to stop);
- an update is accepted only for a range dispatched to the job's current
  attempt, and a range takes at most one terminal status: a second terminal
  update is answered ``False``, never recorded twice;
- a new job attempt re-creates the ranges that did not finish under the new
  attempt number, and updates to the old ones are refused.

Every update, accepted or not, goes into ``range_updates``: the audit trail
that proves "none lost, none doubled".
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from typing import Any

from pilot.server.schema import ACTIVE_JOB_STATES, StoreError, as_float, as_int


class RangeStore:
    """Range operations of :class:`pilot.server.db.Store` (which provides ``tx``/``_query``)."""

    def tx(self) -> Iterator[sqlite3.Connection]:  # provided by Store
        raise NotImplementedError

    def _query(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:  # provided by Store
        raise NotImplementedError

    def insert_ranges(
        self, conn: sqlite3.Connection, panda_id: int, attempt_nr: int, ranges: list[dict]
    ) -> None:
        rows = [
            (
                r["eventRangeID"],
                panda_id,
                attempt_nr,
                i,
                int(r["startEvent"]),
                int(r["lastEvent"]),
                r["LFN"],
                r.get("GUID", ""),
                r.get("scope", ""),
                r.get("PFN", ""),
                "ready",
            )
            for i, r in enumerate(ranges)
        ]
        try:
            conn.executemany(
                "INSERT INTO ranges (range_id, panda_id, attempt_nr, seq, start_event,"
                " last_event, lfn, guid, scope, pfn, status) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                rows,
            )
        except sqlite3.IntegrityError:
            raise StoreError(f"an event range of job {panda_id} already exists") from None

    @staticmethod
    def _job_state(c: sqlite3.Connection, panda_id: int) -> sqlite3.Row | None:
        """Status, attempt and pending command of a job (getEventRanges and updateJob)."""
        return c.execute(
            "SELECT status, attempt_nr, command FROM jobs WHERE panda_id = ?", (panda_id,)
        ).fetchone()

    def dispatch_ranges(self, panda_id: int, n_ranges: int) -> list[dict[str, Any]] | None:
        """getEventRanges: up to ``n_ranges`` ready ranges of the job's current attempt.

        None for an unknown job; an empty list when the job is not running (not
        dispatched yet, finished, or to be killed) or has no ranges left.
        """
        now = time.time()
        with self.tx() as c:
            job = self._job_state(c, panda_id)
            if job is None:
                return None
            if job["status"] not in ACTIVE_JOB_STATES or job["command"] == "tobekilled":
                return []
            rows = c.execute(
                "SELECT range_id, start_event, last_event, lfn, guid, scope, pfn FROM ranges"
                " WHERE panda_id = ? AND attempt_nr = ? AND status = 'ready'"
                " ORDER BY seq LIMIT ?",
                (panda_id, job["attempt_nr"], n_ranges),
            ).fetchall()
            c.executemany(
                "UPDATE ranges SET status = 'sent', dispatched = ?, modified = ? WHERE range_id = ?",
                [(now, now, r["range_id"]) for r in rows],
            )
        out = []
        for r in rows:
            d = {
                "eventRangeID": r["range_id"],
                "startEvent": r["start_event"],
                "lastEvent": r["last_event"],
                "LFN": r["lfn"],
                "GUID": r["guid"],
                "scope": r["scope"],
            }
            if r["pfn"]:
                d["PFN"] = r["pfn"]
            out.append(d)
        return out

    def update_ranges(self, entries: list[dict[str, Any]]) -> tuple[list[bool], dict[str, str]]:
        """updateEventRanges: one bool per entry, plus the commands of the jobs concerned.

        Entries are ``{eventRangeID, eventStatus, errorCode?, errorDiag?,
        cpuConsumptionTime?}``; the caller has checked their types.
        """
        now = time.time()
        results: list[bool] = []
        jobs: dict[int, sqlite3.Row | None] = {}
        audit = []
        with self.tx() as c:
            for e in entries:
                rid, status = e["eventRangeID"], e["eventStatus"]
                row = c.execute(
                    "SELECT panda_id, attempt_nr, status FROM ranges WHERE range_id = ?", (rid,)
                ).fetchone()
                ok = False
                if row is not None:
                    pid = row["panda_id"]
                    if pid not in jobs:
                        jobs[pid] = c.execute(
                            "SELECT attempt_nr, command FROM jobs WHERE panda_id = ?", (pid,)
                        ).fetchone()
                    job = jobs[pid]
                    ok = (
                        job is not None
                        and row["attempt_nr"] == job["attempt_nr"]
                        and row["status"] in ("sent", "running")
                        and not (status == "running" and row["status"] == "running")
                    )
                if ok:
                    c.execute(
                        "UPDATE ranges SET status = ?, error_code = ?, error_diag = ?, cpu = ?,"
                        " modified = ? WHERE range_id = ?",
                        (
                            status,
                            as_int(e.get("errorCode")),
                            str(e.get("errorDiag") or "")[:256] or None,
                            as_float(e.get("cpuConsumptionTime")),
                            now,
                            rid,
                        ),
                    )
                audit.append((rid, status, int(ok), now))
                results.append(ok)
            c.executemany(
                "INSERT INTO range_updates (range_id, status, accepted, received) VALUES (?,?,?,?)",
                audit,
            )
        commands = {
            str(pid): job["command"]
            for pid, job in jobs.items()
            if job is not None and job["command"] not in ("NULL", "")
        }
        return results, commands

    def retry_job(self, panda_id: int) -> int | None:
        """A new attempt: the job is activated again and its unfinished ranges are
        re-created under the new attempt number (updates to the old ones are refused)."""
        now = time.time()
        with self.tx() as c:
            job = c.execute(
                "SELECT attempt_nr FROM jobs WHERE panda_id = ?", (panda_id,)
            ).fetchone()
            if job is None:
                return None
            old, new = job["attempt_nr"], job["attempt_nr"] + 1
            rows = c.execute(
                "SELECT * FROM ranges WHERE panda_id = ? AND attempt_nr = ? AND status NOT IN"
                " ('finished', 'fatal') ORDER BY seq",
                (panda_id, old),
            ).fetchall()
            c.execute(
                "UPDATE ranges SET status = 'cancelled', modified = ? WHERE panda_id = ? AND"
                " attempt_nr = ? AND status IN ('ready', 'sent', 'running')",
                (now, panda_id, old),
            )
            fresh = []
            for r in rows:
                head = r["range_id"].rsplit("-", 1)[0]
                fresh.append(
                    {
                        "eventRangeID": f"{head}-{new}",
                        "startEvent": r["start_event"],
                        "lastEvent": r["last_event"],
                        "LFN": r["lfn"],
                        "GUID": r["guid"],
                        "scope": r["scope"],
                        "PFN": r["pfn"],
                    }
                )
            c.execute(
                "UPDATE jobs SET attempt_nr = ?, status = 'activated', command = 'NULL',"
                " final = NULL, node = '', modified = ? WHERE panda_id = ?",
                (new, now, panda_id),
            )
            self.insert_ranges(c, panda_id, new, fresh)
        return new

    def ranges(self, panda_id: int | None = None) -> list[dict[str, Any]]:
        if panda_id is None:
            rows = self._query("SELECT * FROM ranges ORDER BY panda_id, attempt_nr, seq")
        else:
            rows = self._query(
                "SELECT * FROM ranges WHERE panda_id = ? ORDER BY attempt_nr, seq", (panda_id,)
            )
        return [dict(r) for r in rows]

    def range_counts(self, panda_id: int | None = None) -> dict[str, int]:
        if panda_id is None:
            rows = self._query("SELECT status, COUNT(*) AS n FROM ranges GROUP BY status")
        else:
            rows = self._query(
                "SELECT status, COUNT(*) AS n FROM ranges WHERE panda_id = ? GROUP BY status",
                (panda_id,),
            )
        return {r["status"]: r["n"] for r in rows}

    def range_update_counts(self) -> dict[str, int]:
        """Accepted terminal updates per range (the "never twice" invariant: all 1)."""
        rows = self._query(
            "SELECT range_id, COUNT(*) AS n FROM range_updates WHERE accepted = 1 AND status IN"
            " ('finished', 'failed', 'fatal') GROUP BY range_id"
        )
        return {r["range_id"]: r["n"] for r in rows}
