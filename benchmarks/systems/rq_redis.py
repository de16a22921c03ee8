"""RQ (Redis Queue).

General setup (W1, W2): 2 ``rq worker`` processes (one per core) of class ``SimpleWorker``, which
runs jobs in the worker process; RQ's default ``Worker`` forks a child per job, which costs
milliseconds a job. Tuned on W1 (10,000 jobs, three times): 4 processes ran 481-536 jobs/s, 2 ran
440-541, no clear difference. Bulk enqueue: ``Queue.enqueue_many`` (one
Redis pipeline per call).
I/O setup (W3): RQ runs one job per process, so "100 at a time" takes 100 ``SimpleWorker``
processes; the harness waits until all 100 have registered before timing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any, ClassVar

from redis import Redis
from rq import Queue, Worker

from benchmarks.systems import sink
from benchmarks.systems.base import BULK_CHUNK, SETTLE_S, RedisSystem, Sink, WorkerGroup, WorkerSpec, python_module

REDIS_DB = 12
QUEUE = "bench"


def noop() -> None:
    sink.mark()


def sleep(seconds: float) -> None:
    time.sleep(seconds)
    sink.mark()


class RqRedis(RedisSystem):
    name = "rq"
    label = "RQ (Redis)"
    distribution = "rq"
    redis_db = REDIS_DB
    defaults: ClassVar[Mapping[str, Any]] = {"processes": 2, "worker_class": "rq.worker.SimpleWorker"}

    def __init__(self, *args: Any, **options: Any) -> None:
        super().__init__(*args, **options)
        self._redis: Redis | None = None
        self._queue: Queue | None = None

    def configuration(self) -> dict[str, str]:
        o = self.options
        return {
            "general": f"{o['processes']} rq worker processes, worker class {o['worker_class']}; bulk enqueue "
            f"with Queue.enqueue_many, {BULK_CHUNK} jobs a pipeline",
            "io": "100 rq worker processes, SimpleWorker (time.sleep)",
        }

    @property
    def queue(self) -> Queue:
        assert self._queue is not None, "prepare() first"
        return self._queue

    async def prepare(self) -> None:
        await super().prepare()
        self._redis = Redis.from_url(self.redis_url)
        self._queue = Queue(QUEUE, connection=self._redis)

    async def cleanup(self) -> None:
        if self._redis is not None:
            self._redis.close()
            self._redis, self._queue = None, None
        await super().cleanup()

    async def enqueue_noops(self, n: int) -> None:
        for start in range(0, n, BULK_CHUNK):
            self.queue.enqueue_many([Queue.prepare_data(noop) for _ in range(min(BULK_CHUNK, n - start))])

    async def enqueue_noop(self) -> None:
        self.queue.enqueue(noop)

    async def enqueue_sleeps(self, n: int, seconds: float) -> None:
        for start in range(0, n, BULK_CHUNK):
            self.queue.enqueue_many([Queue.prepare_data(sleep, (seconds,)) for _ in range(min(BULK_CHUNK, n - start))])

    def worker_spec(self, profile: str, concurrency: int) -> WorkerSpec:
        processes = self.options["processes"] if profile == "general" else concurrency
        worker_class = self.options["worker_class"] if profile == "general" else "rq.worker.SimpleWorker"
        argv = python_module(
            "rq.cli",
            "worker",
            "--url",
            self.redis_url,
            "--worker-class",
            worker_class,
            "--quiet",
            "--disable-job-desc-logging",
            QUEUE,
        )
        return WorkerSpec(argv, {}, processes)

    async def wait_ready(self, group: WorkerGroup, sink: Sink, profile: str) -> None:
        deadline = time.monotonic() + self.env.timeout
        while len(Worker.all(queue=self.queue)) < group.spec.processes:
            group.check()
            if time.monotonic() > deadline:
                raise TimeoutError(f"fewer than {group.spec.processes} rq workers registered")
            await asyncio.sleep(0.1)
        await super().wait_ready(group, sink, profile)
        await asyncio.sleep(SETTLE_S)
