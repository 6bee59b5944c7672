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

FINAL_STATES = frozenset({"finished", "failed", "closed", "cancelled"})
REPORTED_STATES = frozenset(
    {"starting", "running", "holding", "transferring", "finished", "failed", "closed"}
)
ACTIVE_JOB_STATES = ("sent", "starting", "running", "holding", "transferring")
RANGE_STATES = frozenset({"running", "finished", "failed", "fatal"})
RANGE_TERMINAL = frozenset({"finished", "failed", "fatal"})
MAX_RANGES_PER_CALL = 100_000
FIRST_PANDA_ID = 1000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    panda_id    INTEGER PRIMARY KEY,
    task_id     INTEGER NOT NULL DEFAULT 0,
    jobset_id   INTEGER NOT NULL DEFAULT 0,
    attempt_nr  INTEGER NOT NULL DEFAULT 1,
    site        TEXT NOT NULL DEFAULT '',
    priority    INTEGER NOT NULL DEFAULT 0,
    status      TEXT NOT NULL,
    command     TEXT NOT NULL DEFAULT 'NULL',
    definition  TEXT NOT NULL,
    node        TEXT NOT NULL DEFAULT '',
    created     REAL NOT NULL,
    dispatched  REAL,
    modified    REAL NOT NULL,
    final       TEXT
);
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs(status, site, priority, panda_id);
CREATE TABLE IF NOT EXISTS ranges (
    range_id    TEXT PRIMARY KEY,
    panda_id    INTEGER NOT NULL,
    attempt_nr  INTEGER NOT NULL,
    seq         INTEGER NOT NULL,
    start_event INTEGER NOT NULL,
    last_event  INTEGER NOT NULL,
    lfn         TEXT NOT NULL,
    guid        TEXT NOT NULL DEFAULT '',
    scope       TEXT NOT NULL DEFAULT '',
    pfn         TEXT NOT NULL DEFAULT '',
    status      TEXT NOT NULL,
    error_code  INTEGER,
    error_diag  TEXT,
    cpu         REAL,
    dispatched  REAL,
    modified    REAL
);
CREATE INDEX IF NOT EXISTS ranges_job ON ranges(panda_id, status, seq);
CREATE TABLE IF NOT EXISTS range_updates (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    range_id    TEXT NOT NULL,
    status      TEXT NOT NULL,
    accepted    INTEGER NOT NULL,
    received    REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS range_updates_id ON range_updates(range_id);
CREATE TABLE IF NOT EXISTS updates (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    panda_id    INTEGER NOT NULL,
    attempt_nr  INTEGER NOT NULL,
    state       TEXT NOT NULL,
    disposition TEXT NOT NULL,
    received    REAL NOT NULL,
    fields      TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS updates_job ON updates(panda_id);
CREATE TABLE IF NOT EXISTS traces (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    received    REAL NOT NULL,
    body        TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS queues (
    name        TEXT PRIMARY KEY,
    config      TEXT NOT NULL
);
"""


class StoreError(ValueError):
    """A request the store refuses (unknown id, duplicate id): the caller's fault, not the server's."""


@dataclass(frozen=True)
class JobUpdateResult:
    """What became of one updateJob call. ``disposition``: recorded, duplicate, stale, late."""

    status_code: int
    command: str
    disposition: str
    error: str = ""


class Store:
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
            self._conn.executescript(_SCHEMA)

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

    def put_queue(self, name: str, config: dict[str, Any]) -> None:
        with self.tx() as c:
            c.execute(
                "INSERT OR REPLACE INTO queues (name, config) VALUES (?, ?)",
                (name, json.dumps(config)),
            )

    def get_queue(self, name: str) -> dict[str, Any] | None:
        rows = self._query("SELECT config FROM queues WHERE name = ?", (name,))
        return json.loads(rows[0]["config"]) if rows else None

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
            job = c.execute(
                "SELECT status, attempt_nr, command FROM jobs WHERE panda_id = ?", (panda_id,)
            ).fetchone()
            if job is None:
                return JobUpdateResult(30, "NULL", "unknown", f"job {panda_id} not found")
            attempt = job["attempt_nr"]
            sent_attempt = _as_int(fields.get("attemptNr"))
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

    def dispatch_ranges(self, panda_id: int, n_ranges: int) -> list[dict[str, Any]] | None:
        """getEventRanges: up to ``n_ranges`` ready ranges of the job's current attempt.

        None for an unknown job; an empty list when the job is not running (not
        dispatched yet, finished, or to be killed) or has no ranges left.
        """
        now = time.time()
        with self.tx() as c:
            job = c.execute(
                "SELECT status, attempt_nr, command FROM jobs WHERE panda_id = ?", (panda_id,)
            ).fetchone()
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
                            _as_int(e.get("errorCode")),
                            str(e.get("errorDiag") or "")[:256] or None,
                            _as_float(e.get("cpuConsumptionTime")),
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

    # -- queries (tests, `pilot status`) ------------------------------------------------

    def job(self, panda_id: int) -> dict[str, Any] | None:
        rows = self._query("SELECT * FROM jobs WHERE panda_id = ?", (panda_id,))
        return _job_record(rows[0]) if rows else None

    def jobs(self) -> list[dict[str, Any]]:
        return [_job_record(r) for r in self._query("SELECT * FROM jobs ORDER BY panda_id")]

    def final_records(self, panda_id: int | None = None) -> list[dict[str, Any]]:
        """The recorded final updates (one per job attempt), oldest first."""
        states = ",".join(f"'{s}'" for s in sorted(FINAL_STATES))
        sql = f"SELECT * FROM updates WHERE disposition = 'recorded' AND state IN ({states})"
        args: tuple = ()
        if panda_id is not None:
            sql += " AND panda_id = ?"
            args = (panda_id,)
        return [_update_record(r) for r in self._query(sql + " ORDER BY id", args)]

    def updates(self, panda_id: int | None = None) -> list[dict[str, Any]]:
        if panda_id is None:
            rows = self._query("SELECT * FROM updates ORDER BY id")
        else:
            rows = self._query("SELECT * FROM updates WHERE panda_id = ? ORDER BY id", (panda_id,))
        return [_update_record(r) for r in rows]

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


def _job_record(row: sqlite3.Row) -> dict[str, Any]:
    d = dict(row)
    d["definition"] = json.loads(d["definition"])
    d["final"] = json.loads(d["final"]) if d["final"] else None
    return d


def _update_record(row: sqlite3.Row) -> dict[str, Any]:
    d = dict(row)
    d["fields"] = json.loads(d["fields"])
    return d


def _as_int(value: Any) -> int | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return int(str(value).strip())
    except ValueError:
        return None


def _as_float(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(str(value).strip())
    except ValueError:
        return None
