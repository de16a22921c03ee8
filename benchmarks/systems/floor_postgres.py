"""The floor on PostgreSQL: the same enqueue/claim/complete cycle in raw SQL, with no queue library.

Enqueue: ``INSERT ... SELECT FROM unnest($1, $2)``, 1,000 rows a statement. Workers (separate
processes, like every system's): ``UPDATE ... WHERE id IN (SELECT ... FOR UPDATE SKIP LOCKED
LIMIT 100) RETURNING``, run each job (one byte to the sink), then one ``UPDATE ... WHERE id =
ANY($1)`` marks the batch done. Logged table, fsync'd commits, like every PostgreSQL system here.
No retries, leases, heartbeats, history or notifications: the storage limit that no queue built on
these statements can beat. General setup: 2 processes x 2 claim loops (one connection each),
1,000 jobs a claim (tuned on W1: batches of 100 ran about 27,000 jobs/s, 500 about 28,000-51,000,
1,000 about 55,000).

Worker role: ``python -m benchmarks.systems.floor_postgres DSN LOOPS BATCH``.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Mapping
from typing import Any, ClassVar

import asyncpg

from benchmarks.systems import sink
from benchmarks.systems.base import BULK_CHUNK, PostgresSystem, WorkerSpec, python_module

SCHEMA = """
CREATE TABLE floor_jobs (
    id bigserial PRIMARY KEY,
    task text NOT NULL,
    args jsonb NOT NULL,
    state text NOT NULL DEFAULT 'queued',
    run_at timestamptz NOT NULL DEFAULT now(),
    attempts integer NOT NULL DEFAULT 0,
    lease_until timestamptz,
    finished_at timestamptz
);
CREATE INDEX floor_jobs_due ON floor_jobs (run_at, id) WHERE state = 'queued';
"""
INSERT = "INSERT INTO floor_jobs (task, args) SELECT * FROM unnest($1::text[], $2::jsonb[])"
CLAIM = """
UPDATE floor_jobs SET state = 'running', attempts = attempts + 1, lease_until = now() + interval '30 seconds'
WHERE id IN (
    SELECT id FROM floor_jobs WHERE state = 'queued' AND run_at <= now()
    ORDER BY run_at, id LIMIT $1 FOR UPDATE SKIP LOCKED
)
RETURNING id, task, args
"""
COMPLETE = "UPDATE floor_jobs SET state = 'done', finished_at = now(), lease_until = NULL WHERE id = ANY($1::bigint[])"
IDLE_S = 0.005


async def _claim_loop(dsn: str, batch: int, stop: asyncio.Event) -> None:
    connection = await asyncpg.connect(dsn)
    try:
        while not stop.is_set():
            rows = await connection.fetch(CLAIM, batch)
            if not rows:
                await asyncio.sleep(IDLE_S)
                continue
            for _ in rows:
                sink.mark()
            await connection.execute(COMPLETE, [row["id"] for row in rows])
    finally:
        await connection.close()


async def work(dsn: str, loops: int, batch: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await asyncio.gather(*(_claim_loop(dsn, batch, stop) for _ in range(loops)))


class FloorPostgres(PostgresSystem):
    name = "floor_postgres"
    label = "Floor: raw SQL (PostgreSQL)"
    distribution = "asyncpg"
    workloads = ("w1",)
    defaults: ClassVar[Mapping[str, Any]] = {"processes": 2, "loops": 2, "batch": 1000}

    def __init__(self, *args: Any, **options: Any) -> None:
        super().__init__(*args, **options)
        self._connection: asyncpg.Connection | None = None

    def version(self) -> str:
        return f"asyncpg {super().version()}"

    def configuration(self) -> dict[str, str]:
        o = self.options
        return {
            "general": f"asyncpg; {o['processes']} processes x {o['loops']} claim loops, claim batch {o['batch']} "
            f"(FOR UPDATE SKIP LOCKED), one UPDATE per batch to complete; enqueue: INSERT ... unnest, "
            f"{BULK_CHUNK} rows a statement",
        }

    async def prepare(self) -> None:
        await super().prepare()
        self._connection = await asyncpg.connect(self.dsn)
        await self._connection.execute(SCHEMA)

    async def cleanup(self) -> None:
        if self._connection is not None:
            await self._connection.close()
            self._connection = None
        await super().cleanup()

    async def enqueue_noops(self, n: int) -> None:
        assert self._connection is not None, "prepare() first"
        for start in range(0, n, BULK_CHUNK):
            size = min(BULK_CHUNK, n - start)
            await self._connection.execute(INSERT, ["noop"] * size, ["[]"] * size)

    def worker_spec(self, profile: str, concurrency: int) -> WorkerSpec:  # noqa: ARG002 - W1 only
        o = self.options
        argv = python_module("benchmarks.systems.floor_postgres", self.dsn, str(o["loops"]), str(o["batch"]))
        return WorkerSpec(argv, {}, o["processes"])


if __name__ == "__main__":
    asyncio.run(work(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
