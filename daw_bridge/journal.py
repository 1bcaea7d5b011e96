"""The crash-safe job journal: SQLite in WAL mode, one row per accepted job.

A job is written (and fsynced: synchronous=FULL) before it is acknowledged, so a job the client was told about
survives kill -9. States: queued → running → done | failed | cancelled. On start, jobs left `running` by a crash
go back to `queued` and run again, in their original order.
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINISHED = (DONE, FAILED, CANCELLED)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    id       TEXT UNIQUE NOT NULL,
    source   TEXT NOT NULL,
    req_id   TEXT NOT NULL DEFAULT '',
    spec     TEXT NOT NULL,
    reply    TEXT,
    state    TEXT NOT NULL,
    progress REAL NOT NULL DEFAULT 0,
    stage    TEXT NOT NULL DEFAULT '',
    error    TEXT,
    result   TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    created  REAL NOT NULL,
    updated  REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, seq);
CREATE TABLE IF NOT EXISTS subscribers (host TEXT NOT NULL, port INTEGER NOT NULL, PRIMARY KEY (host, port));
"""


@dataclass
class Job:
    id: str
    seq: int
    source: str
    req_id: str
    spec: dict
    reply: dict | None
    state: str
    progress: float
    stage: str
    error: dict | None
    result: dict | None
    attempts: int

    @property
    def stems(self) -> dict[str, str]:
        """{'target': path, 'residual': path} of a done job (older journals kept them as the whole result)."""
        result = self.result or {}
        stems = result.get("stems")
        return stems if isinstance(stems, dict) else result

    @property
    def warnings(self) -> list[str]:
        return list((self.result or {}).get("warnings") or [])

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> "Job":
        def load(text):
            return json.loads(text) if text else None

        return cls(row["id"], row["seq"], row["source"], row["req_id"], load(row["spec"]), load(row["reply"]),
                   row["state"], row["progress"], row["stage"], load(row["error"]), load(row["result"]),
                   row["attempts"])


class Journal:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _one(self, sql: str, args=()) -> Job | None:
        with self._lock:
            row = self._db.execute(sql, args).fetchone()
        return Job.from_row(row) if row else None

    def add(self, job_id: str, *, source: str, spec: dict, req_id: str = "", reply: dict | None = None) -> Job:
        now = time.time()
        with self._lock:
            self._db.execute(
                "INSERT INTO jobs (id, source, req_id, spec, reply, state, created, updated) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, source, req_id, json.dumps(spec), json.dumps(reply) if reply else None, QUEUED, now, now),
            )
        return self.get(job_id)

    def get(self, job_id: str) -> Job | None:
        return self._one("SELECT * FROM jobs WHERE id = ?", (job_id,))

    def exists(self, job_id: str) -> bool:
        return self.get(job_id) is not None

    def next_queued(self) -> Job | None:
        return self._one("SELECT * FROM jobs WHERE state = ? ORDER BY seq LIMIT 1", (QUEUED,))

    def queue_length(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM jobs WHERE state IN (?, ?)", (QUEUED, RUNNING)).fetchone()[0]

    def jobs(self, *states: str) -> list[Job]:
        marks = ",".join("?" * len(states))
        with self._lock:
            rows = self._db.execute(f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY seq", states).fetchall()
        return [Job.from_row(r) for r in rows]

    def start(self, job_id: str) -> None:
        self._update(job_id, "state = ?, attempts = attempts + 1, progress = 0, stage = 'starting'", (RUNNING,))

    def progress(self, job_id: str, fraction: float, stage: str) -> None:
        self._update(job_id, "progress = ?, stage = ?", (fraction, stage))

    def finish(self, job_id: str, state: str, *, result: dict | None = None, error: dict | None = None) -> None:
        assert state in FINISHED
        self._update(job_id, "state = ?, result = ?, error = ?, progress = CASE WHEN ? = 'done' THEN 1 ELSE progress END",
                     (state, json.dumps(result) if result else None, json.dumps(error) if error else None, state))

    def requeue(self, job_id: str) -> None:
        self._update(job_id, "state = ?, progress = 0, stage = ''", (QUEUED,))

    def cancel_if_queued(self, job_id: str) -> bool:
        with self._lock:
            cursor = self._db.execute("UPDATE jobs SET state = ?, updated = ? WHERE id = ? AND state = ?",
                                      (CANCELLED, time.time(), job_id, QUEUED))
        return cursor.rowcount == 1

    def recover(self) -> list[Job]:
        """After a crash: jobs left running go back to the queue. Returns every unfinished job, in order."""
        for job in self.jobs(RUNNING):
            self.requeue(job.id)
        return self.jobs(QUEUED)

    def add_subscriber(self, host: str, port: int) -> None:
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO subscribers (host, port) VALUES (?, ?)", (host, port))

    def subscribers(self) -> set[tuple[str, int]]:
        with self._lock:
            return {(r["host"], r["port"]) for r in self._db.execute("SELECT host, port FROM subscribers")}

    def _update(self, job_id: str, assignments: str, args: tuple) -> None:
        with self._lock:
            self._db.execute(f"UPDATE jobs SET {assignments}, updated = ? WHERE id = ?", (*args, time.time(), job_id))
