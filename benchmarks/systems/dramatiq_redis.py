"""Dramatiq with its Redis broker.

General setup (W1, W2): ``dramatiq`` with 2 worker processes (one per core) x 8 threads (the
default; tuned on W1 with 5,000 jobs: 8 threads ran 3,658 jobs/s, 16 3,664, 2 1,027), default
middleware, no retries for the no-op. Dramatiq's Redis consumer polls with an
exponential back-off up to ``worker_timeout`` when idle; it is set to 50 ms here (the default is
1 s), the same as Conveyor-on-SQLite's idle poll. No bulk API: ``actor.send()`` one at a time.
I/O setup (W3): 1 process x 100 threads (time.sleep).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any, ClassVar

import dramatiq
from dramatiq.brokers.redis import RedisBroker

from benchmarks.systems import sink
from benchmarks.systems.base import RedisSystem, WorkerSpec, python_module

REDIS_DB = 13
QUEUE = "bench"
IDLE_POLL_MS = 50

broker = RedisBroker(url=os.environ.get("BENCH_REDIS_URL", f"redis://127.0.0.1:6379/{REDIS_DB}"))
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name=QUEUE, max_retries=0)
def noop() -> None:
    sink.mark()


@dramatiq.actor(queue_name=QUEUE, max_retries=0)
def sleep(seconds: float) -> None:
    time.sleep(seconds)
    sink.mark()


class DramatiqRedis(RedisSystem):
    name = "dramatiq_redis"
    label = "Dramatiq (Redis)"
    distribution = "dramatiq"
    redis_db = REDIS_DB
    defaults: ClassVar[Mapping[str, Any]] = {"processes": 2, "threads": 8}

    def configuration(self) -> dict[str, str]:
        o = self.options
        return {
            "general": f"{o['processes']} processes x {o['threads']} threads, idle poll back-off capped at "
            f"{IDLE_POLL_MS} ms (dramatiq_worker_timeout), prefetch 2 x threads (default); enqueue: send() one "
            "at a time (no bulk API)",
            "io": f"1 process x 100 threads (time.sleep), idle poll cap {IDLE_POLL_MS} ms",
        }

    async def prepare(self) -> None:
        await super().prepare()
        # The module-level broker is the one the actors are bound to: point it at this run's DB.
        broker.client.connection_pool.disconnect()
        broker.client = type(broker.client).from_url(self.redis_url)
        broker.scripts = {name: broker.client.register_script(script.script) for name, script in broker.scripts.items()}

    async def cleanup(self) -> None:
        broker.client.connection_pool.disconnect()
        await super().cleanup()

    async def enqueue_noops(self, n: int) -> None:
        for _ in range(n):
            noop.send()

    async def enqueue_noop(self) -> None:
        noop.send()

    async def enqueue_sleeps(self, n: int, seconds: float) -> None:
        for _ in range(n):
            sleep.send(seconds)

    def worker_spec(self, profile: str, concurrency: int) -> WorkerSpec:
        processes, threads = (
            (self.options["processes"], self.options["threads"]) if profile == "general" else (1, concurrency)
        )
        argv = python_module(
            "dramatiq",
            "benchmarks.systems.dramatiq_redis",
            "--processes",
            str(processes),
            "--threads",
            str(threads),
            "--queues",
            QUEUE,
            "--worker-shutdown-timeout",
            "10000",
        )
        return WorkerSpec(
            argv, {"BENCH_REDIS_URL": self.redis_url, "dramatiq_worker_timeout": str(IDLE_POLL_MS)}, processes=1
        )
