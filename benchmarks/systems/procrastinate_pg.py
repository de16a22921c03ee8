"""Procrastinate on PostgreSQL 15 (psycopg 3; LISTEN/NOTIFY wakes workers; jobs fetched one at a time).

General setup (W1, W2): 4 ``procrastinate worker`` processes x ``concurrency`` 10, LISTEN/NOTIFY
on, finished jobs kept (the default). Bulk enqueue: ``batch_defer_async``, 1,000 jobs a call.
I/O setup (W3): 1 process, concurrency 100 (asyncio.sleep). Tuned on W1 (10,000 jobs, twice,
on a busy machine): 4 x 10 ran 115 and 140 jobs/s, 2 x 20 ran 95 and 117. A worker fetches one
job per transaction, so more processes mean more fetches in flight.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from typing import Any, ClassVar

import procrastinate
from procrastinate.types import JSONDict

from benchmarks.systems import sink
from benchmarks.systems.base import BULK_CHUNK, PostgresSystem, WorkerSpec, python_module

QUEUE = "bench"


def make_app(dsn: str) -> procrastinate.App:
    return procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=dsn))


app = make_app(os.environ.get("BENCH_PG_DSN", ""))


@app.task(name="noop", queue=QUEUE)
async def noop() -> None:
    sink.mark()


@app.task(name="sleep", queue=QUEUE)
async def sleep(seconds: float) -> None:
    await asyncio.sleep(seconds)
    sink.mark()


class ProcrastinatePg(PostgresSystem):
    name = "procrastinate"
    label = "Procrastinate (PostgreSQL)"
    distribution = "procrastinate"
    defaults: ClassVar[Mapping[str, Any]] = {"processes": 4, "concurrency": 10}

    def __init__(self, *args: Any, **options: Any) -> None:
        super().__init__(*args, **options)
        self._app: procrastinate.App | None = None

    def configuration(self) -> dict[str, str]:
        o = self.options
        return {
            "general": f"{o['processes']} worker processes x concurrency {o['concurrency']}, LISTEN/NOTIFY; bulk "
            f"enqueue with batch_defer_async, {BULK_CHUNK} jobs a call",
            "io": "1 worker process, concurrency 100 (asyncio.sleep)",
        }

    @property
    def client(self) -> procrastinate.App:
        assert self._app is not None, "prepare() first"
        return self._app

    async def prepare(self) -> None:
        await super().prepare()
        self._app = make_app(self.dsn)
        await self._app.open_async()
        await self._app.schema_manager.apply_schema_async()

    async def cleanup(self) -> None:
        if self._app is not None:
            await self._app.close_async()
            self._app = None
        await super().cleanup()

    async def enqueue_noops(self, n: int) -> None:
        deferrer = self.client.configure_task("noop", queue=QUEUE)
        for start in range(0, n, BULK_CHUNK):
            await deferrer.batch_defer_async(*({} for _ in range(min(BULK_CHUNK, n - start))))

    async def enqueue_noop(self) -> None:
        await self.client.configure_task("noop", queue=QUEUE).defer_async()

    async def enqueue_sleeps(self, n: int, seconds: float) -> None:
        deferrer = self.client.configure_task("sleep", queue=QUEUE)
        arguments: JSONDict = {"seconds": seconds}
        for start in range(0, n, BULK_CHUNK):
            await deferrer.batch_defer_async(*(arguments for _ in range(min(BULK_CHUNK, n - start))))

    def worker_spec(self, profile: str, concurrency: int) -> WorkerSpec:
        o = self.options
        processes, slots = (o["processes"], o["concurrency"]) if profile == "general" else (1, concurrency)
        argv = python_module(
            "procrastinate",
            "--app",
            "benchmarks.systems.procrastinate_pg.app",
            "--log-level",
            "warning",
            "worker",
            "--queues",
            QUEUE,
            "--concurrency",
            str(slots),
        )
        return WorkerSpec(argv, {"BENCH_PG_DSN": self.dsn}, processes)
