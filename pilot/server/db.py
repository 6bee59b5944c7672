"""SQLite store of the embedded dispatcher: jobs, event ranges, updates, traces, queues.

One connection, guarded by one lock, serves all of waitress's threads: every
request is a short transaction, SQLite serialises writers anyway, and a
single connection makes each PanDA rule (one dispatch, one terminal status
per range and attempt) a plain read-then-write under the lock. WAL lets
``pilot status`` and ``pilot submit --db`` read and write the same file from
another process while the server runs.

The rules kept here are PanDA's:

- a job is dispatched once per attempt (``activated`` -> ``sent``);
- event ranges are dispatched per job attempt, each once;
- an event-range update is accepted only for a range dispatched to the job's
  current attempt, and a range takes at most one terminal status;
- a final ``updateJob`` is recorded once per job attempt: a repeat (a spool
  re-sending after a crash between send and delete) is acknowledged and kept
  in the audit trail, but never becomes a second final record.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pilot.server.ranges import RangeStore
from pilot.server.schema import (
    ACTIVE_JOB_STATES,
    FINAL_STATES,
    FIRST_PANDA_ID,
    MAX_RANGES_PER_CALL,
    RANGE_STATES,
    RANGE_TERMINAL,
    REPORTED_STATES,
    SCHEMA,
    StoreError,
    as_int,
    job_record,
    update_record,
)

__all__ = [
    "ACTIVE_JOB_STATES",
    "FINAL_STATES",
    "MAX_RANGES_PER_CALL",
    "RANGE_STATES",
    "RANGE_TERMINAL",
    "REPORTED_STATES",
    "JobUpdateResult",
    "Store",
    "StoreError",
]


@dataclass(frozen=True)
class JobUpdateResult:
    """What became of one updateJob call. ``disposition``: recorded, duplicate, stale, late."""

    status_code: int
    command: str
    disposition: str
    error: str = ""


class Store(RangeStore):
    """The dispatcher's database. Thread-safe; one instance per process and file."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(
            self.path, timeout=30.0, isolation_level=None, check_same_thread=False
        )
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("PRAGMA busy_timeout=30000")
        with self._lock:
            self._conn.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction under the lock (BEGIN IMMEDIATE: no upgrade deadlocks)."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _query(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    def query(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        """Any read query, for tests and tools that look at the audit tables directly."""
        return self._query(sql, args)

    # -- loading -------------------------------------------------------------------

    def next_panda_id(self, conn: sqlite3.Connection) -> int:
        row = conn.execute("SELECT MAX(panda_id) FROM jobs").fetchone()
        return max(row[0] or 0, FIRST_PANDA_ID) + 1

    def next_task_id(self, conn: sqlite3.Connection) -> int:
        row = conn.execute("SELECT MAX(task_id) FROM jobs").fetchone()
        return max(row[0] or 0, FIRST_PANDA_ID) + 1

    def insert_job(self, conn: sqlite3.Connection, definition: dict[str, Any]) -> int:
        """Insert one job (``PandaID`` already set); StoreError if the id is taken."""
        panda_id = int(definition["PandaID"])
        now = time.time()
        try:
            conn.execute(
                "INSERT INTO jobs (panda_id, task_id, jobset_id, attempt_nr, site, priority,"
                " status, definition, created, modified) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (
                    panda_id,
                    int(definition.get("taskID") or 0),
                    int(definition.get("jobsetID") or 0),
                    int(definition.get("attemptNr") or 1),
                    str(definition.get("computingSite") or ""),
                    int(definition.get("currentPriority") or 0),
                    "activated",
                    json.dumps(definition),
                    now,
                    now,
                ),
            )
        except sqlite3.IntegrityError:
            raise StoreError(f"PandaID {panda_id} already exists") from None
        return panda_id

    def put_queue(self, name: str, config: dict[str, Any]) -> None:
        with self.tx() as c:
            c.execute(
                "INSERT OR REPLACE INTO queues (name, config) VALUES (?, ?)",
                (name, json.dumps(config)),
            )

    def get_queue(self, name: str) -> dict[str, Any] | None:
        rows = self._query("SELECT config FROM queues WHERE name = ?", (name,))
        return json.loads(rows[0]["config"]) if rows else None

    def put_storages(self, storages: dict[str, dict[str, Any]]) -> None:
        with self.tx() as c:
            c.executemany(
                "INSERT OR REPLACE INTO storages (name, config) VALUES (?, ?)",
                [(name, json.dumps(config)) for name, config in storages.items()],
            )

    def storages(self) -> dict[str, dict[str, Any]]:
        rows = self._query("SELECT name, config FROM storages ORDER BY name")
        return {r["name"]: json.loads(r["config"]) for r in rows}

    # -- the pilot's calls -----------------------------------------------------------

    def dispatch_job(self, site: str, node: str) -> dict[str, Any] | None:
        """getJob: hand the oldest, highest-priority activated job of ``site`` out, once."""
        with self.tx() as c:
            row = c.execute(
                "SELECT panda_id, attempt_nr, definition FROM jobs WHERE status = 'activated'"
                " AND (site = '' OR site = ?) ORDER BY priority DESC, panda_id LIMIT 1",
                (site,),
            ).fetchone()
            if row is None:
                return None
            now = time.time()
            c.execute(
                "UPDATE jobs SET status = 'sent', node = ?, dispatched = ?, modified = ?"
                " WHERE panda_id = ?",
                (node, now, now, row["panda_id"]),
            )
        definition = json.loads(row["definition"])
        definition["PandaID"] = row["panda_id"]
        definition["attemptNr"] = row["attempt_nr"]
        return definition

    def update_job(self, panda_id: int, state: str, fields: dict[str, Any]) -> JobUpdateResult:
        """updateJob. Unknown job: StatusCode 30. A stale attempt or a killed job: tobekilled."""
        now = time.time()
        with self.tx() as c:
            job = self._job_state(c, panda_id)
            if job is None:
                return JobUpdateResult(30, "NULL", "unknown", f"job {panda_id} not found")
            attempt = job["attempt_nr"]
            sent_attempt = as_int(fields.get("attemptNr"))
            command = job["command"]
            if sent_attempt is not None and sent_attempt != attempt:
                disposition, command = "stale", "tobekilled"
            elif job["status"] in FINAL_STATES:
                disposition = "duplicate" if state in FINAL_STATES else "late"
                if job["status"] == "cancelled":
                    command = "tobekilled"
            elif job["status"] == "activated":
                disposition, command = "stale", "tobekilled"
            else:
                disposition = "recorded"
                final = json.dumps(fields) if state in FINAL_STATES else None
                c.execute(
                    "UPDATE jobs SET status = ?, modified = ?, final = COALESCE(?, final)"
                    " WHERE panda_id = ?",
                    (state, now, final, panda_id),
                )
            c.execute(
                "INSERT INTO updates (panda_id, attempt_nr, state, disposition, received, fields)"
                " VALUES (?,?,?,?,?,?)",
                (panda_id, attempt, state, disposition, now, json.dumps(fields)),
            )
        return JobUpdateResult(0, command or "NULL", disposition)

    def add_traces(self, bodies: list[dict[str, Any]]) -> int:
        now = time.time()
        with self.tx() as c:
            c.executemany(
                "INSERT INTO traces (received, body) VALUES (?, ?)",
                [(now, json.dumps(b)) for b in bodies],
            )
        return len(bodies)

    # -- administration --------------------------------------------------------------

    def cancel_job(self, panda_id: int) -> str | None:
        """Cancel: a job not yet dispatched is cancelled; a running one is told tobekilled."""
        now = time.time()
        with self.tx() as c:
            job = c.execute("SELECT status FROM jobs WHERE panda_id = ?", (panda_id,)).fetchone()
            if job is None:
                return None
            if job["status"] == "activated":
                c.execute(
                    "UPDATE jobs SET status = 'cancelled', command = 'tobekilled', modified = ?"
                    " WHERE panda_id = ?",
                    (now, panda_id),
                )
                return "cancelled"
            if job["status"] in FINAL_STATES:
                return job["status"]
            c.execute(
                "UPDATE jobs SET command = 'tobekilled', modified = ? WHERE panda_id = ?",
                (now, panda_id),
            )
            return "tobekilled"

    # -- queries (tests, `pilot status`) ------------------------------------------------

    def job(self, panda_id: int) -> dict[str, Any] | None:
        rows = self._query("SELECT * FROM jobs WHERE panda_id = ?", (panda_id,))
        return job_record(rows[0]) if rows else None

    def jobs(self) -> list[dict[str, Any]]:
        return [job_record(r) for r in self._query("SELECT * FROM jobs ORDER BY panda_id")]

    def final_records(self, panda_id: int | None = None) -> list[dict[str, Any]]:
        """The recorded final updates (one per job attempt), oldest first."""
        states = ",".join(f"'{s}'" for s in sorted(FINAL_STATES))
        sql = f"SELECT * FROM updates WHERE disposition = 'recorded' AND state IN ({states})"
        args: tuple = ()
        if panda_id is not None:
            sql += " AND panda_id = ?"
            args = (panda_id,)
        return [update_record(r) for r in self._query(sql + " ORDER BY id", args)]

    def updates(self, panda_id: int | None = None) -> list[dict[str, Any]]:
        if panda_id is None:
            rows = self._query("SELECT * FROM updates ORDER BY id")
        else:
            rows = self._query("SELECT * FROM updates WHERE panda_id = ? ORDER BY id", (panda_id,))
        return [update_record(r) for r in rows]

    def traces(self) -> list[dict[str, Any]]:
        return [json.loads(r["body"]) for r in self._query("SELECT body FROM traces ORDER BY id")]

    def summary(self) -> list[dict[str, Any]]:
        """One line per job with its range counts, for ``pilot status``."""
        counts: dict[int, dict[str, int]] = {}
        for r in self._query(
            "SELECT panda_id, status, COUNT(*) AS n FROM ranges GROUP BY panda_id, status"
        ):
            counts.setdefault(r["panda_id"], {})[r["status"]] = r["n"]
        out = []
        for r in self._query(
            "SELECT panda_id, task_id, attempt_nr, site, status, command, node FROM jobs"
            " ORDER BY panda_id"
        ):
            d = dict(r)
            d["ranges"] = counts.get(r["panda_id"], {})
            out.append(d)
        return out
