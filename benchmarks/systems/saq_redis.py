"""SAQ (Simple Async Queue) on Redis: workers block on BLMOVE, so an idle worker wakes at once.

General setup (W1, W2): 2 ``saq`` worker processes (one per core), ``concurrency`` 20 each (tuned
on W1: 4 processes and concurrency 100 were no better, within this machine's noise),
other settings default (job status and result kept in Redis). No bulk API: ``Queue.enqueue``
calls, 100 in flight at once. I/O setup (W3): 1 process, concurrency 100 (asyncio.sleep).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from typing import Any, ClassVar

from saq import Queue

from benchmarks.systems import sink
from benchmarks.systems.base import CONCURRENT_ENQUEUES, RedisSystem, WorkerSpec, python_module

REDIS_DB = 15
QUEUE = "bench"


async def noop(_ctx: Any) -> None:
    sink.mark()


async def sleep(_ctx: Any, *, seconds: float) -> None:
    await asyncio.sleep(seconds)
    sink.mark()


settings = {
    "queue": Queue.from_url(os.environ.get("BENCH_REDIS_URL", f"redis://127.0.0.1:6379/{REDIS_DB}"), name=QUEUE),
    "functions": [noop, sleep],
    "concurrency": int(os.environ.get("BENCH_SAQ_CONCURRENCY", "20")),
}


class SaqRedis(RedisSystem):
    name = "saq"
    label = "SAQ (Redis)"
    distribution = "saq"
    redis_db = REDIS_DB
    defaults: ClassVar[Mapping[str, Any]] = {"processes": 2, "concurrency": 20}

    def __init__(self, *args: Any, **options: Any) -> None:
        super().__init__(*args, **options)
        self._queue: Queue | None = None

    def configuration(self) -> dict[str, str]:
        o = self.options
        return {
            "general": f"{o['processes']} worker processes x concurrency {o['concurrency']}; enqueue: "
            f"Queue.enqueue, {CONCURRENT_ENQUEUES} in flight (no bulk API)",
            "io": "1 worker process, concurrency 100 (asyncio.sleep)",
        }

    @property
    def queue(self) -> Queue:
        assert self._queue is not None, "prepare() first"
        return self._queue

    async def prepare(self) -> None:
        await super().prepare()
        self._queue = Queue.from_url(self.redis_url, name=QUEUE)
        await self._queue.connect()

    async def cleanup(self) -> None:
        if self._queue is not None:
            await self._queue.disconnect()
            self._queue = None
        await super().cleanup()

    async def _enqueue(self, n: int, function: str, **kwargs: Any) -> None:
        for start in range(0, n, CONCURRENT_ENQUEUES):
            size = min(CONCURRENT_ENQUEUES, n - start)
            await asyncio.gather(*(self.queue.enqueue(function, **kwargs) for _ in range(size)))

    async def enqueue_noops(self, n: int) -> None:
        await self._enqueue(n, "noop")

    async def enqueue_noop(self) -> None:
        await self.queue.enqueue("noop")

    async def enqueue_sleeps(self, n: int, seconds: float) -> None:
        await self._enqueue(n, "sleep", seconds=seconds)

    def worker_spec(self, profile: str, concurrency: int) -> WorkerSpec:
        o = self.options
        processes, slots = (o["processes"], o["concurrency"]) if profile == "general" else (1, concurrency)
        argv = python_module("saq", "benchmarks.systems.saq_redis.settings")
        return WorkerSpec(argv, {"BENCH_REDIS_URL": self.redis_url, "BENCH_SAQ_CONCURRENCY": str(slots)}, processes)
