"""arq: asyncio jobs on Redis.

General setup (W1, W2): 2 ``arq`` worker processes (one per core), ``max_jobs`` 100 each, and
``poll_delay`` 50 ms (the default 0.5 s is arq's only wake-up: workers poll a sorted set, and
sleep ``poll_delay`` between polls even when busy), the same as Conveyor-on-SQLite's idle poll.
Results kept as by default (1 h). Tuned on W1: ``max_jobs`` 500 was no better than 100.
No bulk API: ``enqueue_job`` calls, 100 in flight at once.
Logging at WARNING (arq's default logs two INFO lines per job). I/O setup (W3): 1 process,
``max_jobs`` 100 (asyncio.sleep).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from typing import Any, ClassVar

from arq import ArqRedis, create_pool
from arq.connections import RedisSettings

from benchmarks.systems import sink
from benchmarks.systems.base import CONCURRENT_ENQUEUES, RedisSystem, WorkerSpec, python_module

REDIS_DB = 14


async def noop(_ctx: dict[str, Any]) -> None:
    sink.mark()


async def sleep(_ctx: dict[str, Any], seconds: float) -> None:
    await asyncio.sleep(seconds)
    sink.mark()


class WorkerSettings:
    """Read by ``arq benchmarks.systems.arq_redis.WorkerSettings``; the harness sets the environment."""

    functions: ClassVar[list[Any]] = [noop, sleep]
    redis_settings = RedisSettings.from_dsn(os.environ.get("BENCH_REDIS_URL", f"redis://127.0.0.1:6379/{REDIS_DB}"))
    max_jobs = int(os.environ.get("BENCH_ARQ_MAX_JOBS", "100"))
    poll_delay = float(os.environ.get("BENCH_ARQ_POLL_DELAY", "0.05"))


LOG_CONFIG = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"stderr": {"class": "logging.StreamHandler", "level": "WARNING"}},
    "loggers": {"arq": {"handlers": ["stderr"], "level": "WARNING"}},
}


class ArqRedisSystem(RedisSystem):
    name = "arq"
    label = "arq (Redis)"
    distribution = "arq"
    redis_db = REDIS_DB
    defaults: ClassVar[Mapping[str, Any]] = {"processes": 2, "max_jobs": 100, "poll_delay": 0.05}

    def __init__(self, *args: Any, **options: Any) -> None:
        super().__init__(*args, **options)
        self._pool: ArqRedis | None = None

    def configuration(self) -> dict[str, str]:
        o = self.options
        return {
            "general": f"{o['processes']} worker processes, max_jobs {o['max_jobs']}, poll_delay {o['poll_delay']} s; "
            f"enqueue: enqueue_job, {CONCURRENT_ENQUEUES} in flight (no bulk API)",
            "io": f"1 worker process, max_jobs 100, poll_delay {o['poll_delay']} s (asyncio.sleep)",
        }

    @property
    def pool(self) -> ArqRedis:
        assert self._pool is not None, "prepare() first"
        return self._pool

    async def prepare(self) -> None:
        await super().prepare()
        self._pool = await create_pool(RedisSettings.from_dsn(self.redis_url))

    async def cleanup(self) -> None:
        if self._pool is not None:
            await self._pool.aclose()
            self._pool = None
        await super().cleanup()

    async def _enqueue(self, n: int, function: str, *args: Any) -> None:
        for start in range(0, n, CONCURRENT_ENQUEUES):
            size = min(CONCURRENT_ENQUEUES, n - start)
            await asyncio.gather(*(self.pool.enqueue_job(function, *args) for _ in range(size)))

    async def enqueue_noops(self, n: int) -> None:
        await self._enqueue(n, "noop")

    async def enqueue_noop(self) -> None:
        await self.pool.enqueue_job("noop")

    async def enqueue_sleeps(self, n: int, seconds: float) -> None:
        await self._enqueue(n, "sleep", seconds)

    def worker_spec(self, profile: str, concurrency: int) -> WorkerSpec:
        o = self.options
        processes, max_jobs = (o["processes"], o["max_jobs"]) if profile == "general" else (1, concurrency)
        argv = python_module(
            "arq",
            "--custom-log-dict",
            "benchmarks.systems.arq_redis.LOG_CONFIG",
            "benchmarks.systems.arq_redis.WorkerSettings",
        )
        env = {
            "BENCH_REDIS_URL": self.redis_url,
            "BENCH_ARQ_MAX_JOBS": str(max_jobs),
            "BENCH_ARQ_POLL_DELAY": str(o["poll_delay"]),
        }
        return WorkerSpec(argv, env, processes)
