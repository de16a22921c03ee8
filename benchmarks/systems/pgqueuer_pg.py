"""PgQueuer on PostgreSQL 15 (asyncpg; LISTEN/NOTIFY wakes workers; batched dequeue with SKIP LOCKED).

General setup (W1, W2): 2 worker processes (one per core), batch size 1,000, durable
(logged) tables, the default "delete finished jobs, keep a log" behaviour. Bulk enqueue:
``Queries.enqueue`` with lists, 1,000 jobs a call. I/O setup (W3): 1 process, max concurrent
tasks 100, batch size 50 (at most half the cap, pgqueuer requires) (asyncio.sleep). Tuned on W1
with 10,000 jobs, six runs each (medians): batch size 100 ran about 18,000 jobs/s, 500 about
25,000, 1,000 about 26,000 (an earlier tuning with 5,000 jobs had the default 10 at 2,648).
Processes, medians of four runs (2026-12-01): 2 about 27,700 jobs/s, 3 about 26,200, 4 about
24,000.

Workers run ``pgqueuer.run(factory, ...)``, the library's own equivalent of ``pgq run``: with
typer 0.29 the ``pgq run`` command fails before starting (its ``--log-level`` parser hands a
``str`` where an enum is expected, even for the default).

Worker role: ``python -m benchmarks.systems.pgqueuer_pg BATCH_SIZE MAX_CONCURRENT_TASKS`` (0: no cap).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import AsyncGenerator, Mapping
from typing import Any, ClassVar

import asyncpg
import pgqueuer
from pgqueuer import Job, PgQueuer
from pgqueuer.queries import Queries

from benchmarks.systems import sink
from benchmarks.systems.base import BULK_CHUNK, PostgresSystem, WorkerSpec, python_module


@contextlib.asynccontextmanager
async def create() -> AsyncGenerator[PgQueuer]:
    """The worker's factory (what ``pgq run benchmarks.systems.pgqueuer_pg:create`` would load)."""
    connection = await asyncpg.connect(os.environ["BENCH_PG_DSN"])
    pgq = PgQueuer.from_asyncpg_connection(connection)

    @pgq.entrypoint("noop")
    async def noop(_job: Job) -> None:
        sink.mark()

    @pgq.entrypoint("sleep")
    async def sleep(job: Job) -> None:
        await asyncio.sleep(float(job.payload or b"0"))
        sink.mark()

    try:
        yield pgq
    finally:
        await connection.close()


def work(batch_size: int, max_concurrent_tasks: int | None) -> None:
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(pgqueuer.run(create, batch_size=batch_size, max_concurrent_tasks=max_concurrent_tasks))


class PgQueuerPg(PostgresSystem):
    name = "pgqueuer"
    label = "PgQueuer (PostgreSQL)"
    distribution = "pgqueuer"
    defaults: ClassVar[Mapping[str, Any]] = {"processes": 2, "batch_size": 1000}

    def __init__(self, *args: Any, **options: Any) -> None:
        super().__init__(*args, **options)
        self._connection: asyncpg.Connection | None = None
        self._queries: Queries | None = None

    def configuration(self) -> dict[str, str]:
        o = self.options
        return {
            "general": f"{o['processes']} worker processes (pgqueuer.run), batch size {o['batch_size']}, durable "
            f"tables; bulk enqueue with Queries.enqueue(lists), {BULK_CHUNK} jobs a call",
            "io": "1 worker process (pgqueuer.run), max concurrent tasks 100, batch size 50 (pgqueuer wants at most "
            "half the cap) (asyncio.sleep)",
        }

    @property
    def queries(self) -> Queries:
        assert self._queries is not None, "prepare() first"
        return self._queries

    async def prepare(self) -> None:
        await super().prepare()
        self._connection = await asyncpg.connect(self.dsn)
        self._queries = Queries.from_asyncpg_connection(self._connection)
        await self._queries.install()

    async def cleanup(self) -> None:
        if self._connection is not None:
            await self._connection.close()
            self._connection, self._queries = None, None
        await super().cleanup()

    async def _enqueue(self, n: int, entrypoint: str, payload: bytes | None) -> None:
        for start in range(0, n, BULK_CHUNK):
            size = min(BULK_CHUNK, n - start)
            await self.queries.enqueue([entrypoint] * size, [payload] * size, [0] * size)

    async def enqueue_noops(self, n: int) -> None:
        await self._enqueue(n, "noop", None)

    async def enqueue_noop(self) -> None:
        await self.queries.enqueue("noop", None)

    async def enqueue_sleeps(self, n: int, seconds: float) -> None:
        await self._enqueue(n, "sleep", str(seconds).encode())

    def worker_spec(self, profile: str, concurrency: int) -> WorkerSpec:
        o = self.options
        processes, batch, cap = (
            (o["processes"], o["batch_size"], 0) if profile == "general" else (1, max(1, concurrency // 2), concurrency)
        )
        argv = python_module("benchmarks.systems.pgqueuer_pg", str(batch), str(cap))
        return WorkerSpec(argv, {"BENCH_PG_DSN": self.dsn}, processes)


if __name__ == "__main__":
    work(int(sys.argv[1]), int(sys.argv[2]) or None)
