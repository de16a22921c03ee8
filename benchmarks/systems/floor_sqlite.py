"""The floor on SQLite: the same enqueue/claim/complete cycle in raw SQL, with no queue library.

The stdlib ``sqlite3`` module, WAL and ``synchronous=NORMAL`` (as Conveyor sets them). Enqueue:
``executemany`` INSERT, 1,000 rows a transaction. The worker (a separate process): ``BEGIN
IMMEDIATE``; ``UPDATE ... WHERE id IN (SELECT ... LIMIT 100) RETURNING``; commit; run each job
(one byte to the sink); one ``UPDATE ... WHERE id IN (...)`` marks the batch done. SQLite has one
writer at a time, so one worker process. No retries, leases, heartbeats or history.

Worker role: ``python -m benchmarks.systems.floor_sqlite PATH BATCH``.
"""

from __future__ import annotations

import signal
import sqlite3
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from benchmarks.systems import sink
from benchmarks.systems.base import BULK_CHUNK, System, WorkerSpec, python_module

SCHEMA = """
CREATE TABLE floor_jobs (
    id INTEGER PRIMARY KEY,
    task TEXT NOT NULL,
    args TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'queued',
    run_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now')),
    attempts INTEGER NOT NULL DEFAULT 0,
    lease_until TEXT,
    finished_at TEXT
);
CREATE INDEX floor_jobs_due ON floor_jobs (run_at, id) WHERE state = 'queued';
"""
INSERT = "INSERT INTO floor_jobs (task, args) VALUES (?, ?)"
CLAIM = """
UPDATE floor_jobs SET state = 'running', attempts = attempts + 1,
    lease_until = strftime('%Y-%m-%d %H:%M:%f', 'now', '+30 seconds')
WHERE id IN (
    SELECT id FROM floor_jobs WHERE state = 'queued' AND run_at <= strftime('%Y-%m-%d %H:%M:%f', 'now')
    ORDER BY run_at, id LIMIT ?
)
RETURNING id, task, args
"""
COMPLETE = (
    "UPDATE floor_jobs SET state = 'done', finished_at = strftime('%Y-%m-%d %H:%M:%f', 'now'), lease_until = NULL "
    "WHERE id IN (SELECT value FROM json_each(?))"
)
IDLE_S = 0.005


def connect(path: Path) -> sqlite3.Connection:
    connection = sqlite3.connect(path, isolation_level=None, timeout=30)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")
    return connection


def work(path: Path, batch: int) -> None:
    stopping = False

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    connection = connect(path)
    try:
        while not stopping:
            connection.execute("BEGIN IMMEDIATE")
            rows = connection.execute(CLAIM, (batch,)).fetchall()
            connection.execute("COMMIT")
            if not rows:
                time.sleep(IDLE_S)
                continue
            for _ in rows:
                sink.mark()
            connection.execute("BEGIN IMMEDIATE")
            connection.execute(COMPLETE, (str([row[0] for row in rows]),))
            connection.execute("COMMIT")
    finally:
        connection.close()


class FloorSqlite(System):
    name = "floor_sqlite"
    label = "Floor: raw SQL (SQLite)"
    distribution = "sqlite3 (standard library)"
    storage = "sqlite"
    workloads = ("w1",)
    defaults: ClassVar[Mapping[str, Any]] = {"batch": 100}

    def __init__(self, *args: Any, **options: Any) -> None:
        super().__init__(*args, **options)
        self.path: Path | None = None

    def version(self) -> str:
        return f"sqlite3, SQLite {sqlite3.sqlite_version}"

    def configuration(self) -> dict[str, str]:
        return {
            "general": f"sqlite3 (stdlib), WAL, synchronous=NORMAL; 1 process, claim batch {self.options['batch']}, "
            f"one UPDATE per batch to complete; enqueue: executemany, {BULK_CHUNK} rows a transaction",
        }

    async def prepare(self) -> None:
        self.path = self.scratch("floor").with_suffix(".db")
        connection = connect(self.path)
        try:
            connection.executescript(SCHEMA)
        finally:
            connection.close()

    async def cleanup(self) -> None:
        if self.path is not None:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)
            self.path = None

    async def enqueue_noops(self, n: int) -> None:
        assert self.path is not None, "prepare() first"
        connection = connect(self.path)
        try:
            for start in range(0, n, BULK_CHUNK):
                size = min(BULK_CHUNK, n - start)
                connection.execute("BEGIN IMMEDIATE")
                connection.executemany(INSERT, [("noop", "[]")] * size)
                connection.execute("COMMIT")
        finally:
            connection.close()

    def worker_spec(self, profile: str, concurrency: int) -> WorkerSpec:  # noqa: ARG002 - W1 only
        assert self.path is not None, "prepare() first"
        return WorkerSpec(python_module("benchmarks.systems.floor_sqlite", str(self.path), str(self.options["batch"])))


if __name__ == "__main__":
    work(Path(sys.argv[1]), int(sys.argv[2]))
