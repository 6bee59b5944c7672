"""Schema and shared vocabulary of the dispatcher's SQLite store.

State names are PanDA's: jobs go ``activated`` -> ``sent`` -> the states the
pilot reports; ranges go ``ready`` -> ``sent`` -> ``running`` -> a terminal
``finished``/``failed``/``fatal``, or ``cancelled`` when a new job attempt
replaces them.
"""

from __future__ import annotations

import json
import sqlite3
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

SCHEMA = """
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
CREATE TABLE IF NOT EXISTS storages (
    name        TEXT PRIMARY KEY,
    config      TEXT NOT NULL
);
"""


class StoreError(ValueError):
    """A request the store refuses (unknown id, duplicate id): the caller's fault, not the server's."""


def job_record(row: sqlite3.Row) -> dict[str, Any]:
    d = dict(row)
    d["definition"] = json.loads(d["definition"])
    d["final"] = json.loads(d["final"]) if d["final"] else None
    return d


def update_record(row: sqlite3.Row) -> dict[str, Any]:
    d = dict(row)
    d["fields"] = json.loads(d["fields"])
    return d


def as_int(value: Any) -> int | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return int(str(value).strip())
    except ValueError:
        return None


def as_float(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(str(value).strip())
    except ValueError:
        return None
