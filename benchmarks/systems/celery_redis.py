"""Celery with the Redis broker (kombu's Redis transport: LPUSH to enqueue, BRPOP to fetch).

General setup (W1, W2): 2 ``celery worker`` processes (one per core) with the ``solo`` pool,
prefetch multiplier 64, acks on receipt (Celery's default), no result backend
(``task_ignore_result``), and gossip, mingle and heartbeat off (they only cost on one machine).
Tuned on W1 with 5,000 jobs: 2 x solo ran 1,174 jobs/s, one prefork worker of 2 children 676-723
(its parent process hands every message to a child over a pipe), 3 x solo 1,163.
I/O setup (W3): one worker with the thread pool, 100 threads. Celery has no bulk publish: jobs
are sent one ``apply_async`` at a time over one shared producer connection.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any, ClassVar

from celery import Celery

from benchmarks.systems import sink
from benchmarks.systems.base import RedisSystem, WorkerSpec, python_module

REDIS_DB = 11
QUEUE = "bench"

app = Celery("bench", broker=os.environ.get("BENCH_REDIS_URL", f"redis://127.0.0.1:6379/{REDIS_DB}"))
app.conf.update(
    task_ignore_result=True,
    task_default_queue=QUEUE,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    worker_redirect_stdouts=False,
)


@app.task(name="noop")
def noop() -> None:
    sink.mark()


@app.task(name="sleep")
def sleep(seconds: float) -> None:
    time.sleep(seconds)
    sink.mark()


class CeleryRedis(RedisSystem):
    name = "celery_redis"
    label = "Celery (Redis)"
    distribution = "celery"
    redis_db = REDIS_DB
    defaults: ClassVar[Mapping[str, Any]] = {"pool": "solo", "concurrency": 1, "processes": 2, "prefetch": 64}

    def configuration(self) -> dict[str, str]:
        o = self.options
        return {
            "general": f"{o['processes']} worker(s), pool {o['pool']} x {o['concurrency']}, prefetch multiplier "
            f"{o['prefetch']}, no result backend, --without-gossip/mingle/heartbeat; enqueue: apply_async one "
            "at a time on a shared producer (no bulk API)",
            "io": "1 worker, pool threads x 100 (time.sleep)",
        }

    async def prepare(self) -> None:
        await super().prepare()
        app.close()  # drops pooled connections; the next publish connects to this run's DB
        app.conf.broker_url = self.redis_url

    async def cleanup(self) -> None:
        app.close()
        await super().cleanup()

    async def enqueue_noops(self, n: int) -> None:
        with app.producer_or_acquire() as producer:
            for _ in range(n):
                noop.apply_async(producer=producer)

    async def enqueue_noop(self) -> None:
        noop.apply_async()

    async def enqueue_sleeps(self, n: int, seconds: float) -> None:
        with app.producer_or_acquire() as producer:
            for _ in range(n):
                sleep.apply_async((seconds,), producer=producer)

    def worker_spec(self, profile: str, concurrency: int) -> WorkerSpec:
        o = self.options
        pool, slots, processes, prefetch = (
            (o["pool"], o["concurrency"], o["processes"], o["prefetch"])
            if profile == "general"
            else ("threads", concurrency, 1, 4)
        )
        argv = python_module(
            "celery",
            "-A",
            "benchmarks.systems.celery_redis",
            "worker",
            "--pool",
            pool,
            "--concurrency",
            str(slots),
            "--prefetch-multiplier",
            str(prefetch),
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "--loglevel",
            "WARNING",
            "-Q",
            QUEUE,
            "-n",
            f"bench-{os.getpid()}-%i@localhost",
        )
        return WorkerSpec(argv, {"BENCH_REDIS_URL": self.redis_url}, processes)
