"""Conveyor itself: the benchmark tasks and the harness side shared by its SQLite and PostgreSQL runs.

Workers run ``python -m conveyor worker --app benchmarks.systems.conveyor_common:app``, which
reads ``CONVEYOR_DATABASE_URL`` from the environment the harness gives each worker process.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, ClassVar

from benchmarks.systems import sink
from benchmarks.systems.base import BULK_CHUNK, Env, System, WorkerSpec, python_module
from conveyor import Conveyor, Task

app = Conveyor()


Noop = Task[[], Any]
Sleep = Task[..., Any]


def register(target: Conveyor) -> tuple[Noop, Sleep]:
    """The benchmark tasks, on ``target``: the workers' app and the harness's own."""

    @target.task(name="noop")
    async def noop() -> None:
        sink.mark()

    @target.task(name="sleep")
    async def sleep(seconds: float) -> None:
        await asyncio.sleep(seconds)
        sink.mark()

    return noop, sleep


register(app)


class ConveyorSystem(System):
    distribution = "conveyor"
    defaults: ClassVar[Mapping[str, Any]] = {"processes": 1, "concurrency": 100, "claim_batch": 100}

    def __init__(self, env: Env, **options: Any) -> None:
        super().__init__(env, **options)
        self._app: Conveyor | None = None
        self._tasks: tuple[Noop, Sleep] | None = None

    @property
    def database_url(self) -> str:
        raise NotImplementedError

    def configuration(self) -> dict[str, str]:
        return {
            "general": f"{self._processes_described()} x concurrency {self.options['concurrency']} "
            "(claims up to its free slots plus prefetch, at most "
            f"claim_batch_size={self.options['claim_batch']} at a time; "
            "prefetch default = min(concurrency, claim_batch_size)), "
            f"async task; bulk enqueue with app.enqueue_many, {BULK_CHUNK} jobs a call; single enqueue with "
            "task.enqueue()",
            "io": "1 worker process x concurrency 100, async task (asyncio.sleep)",
        }

    def _processes_described(self) -> str:
        processes = self.options["processes"]
        if processes == 1:
            return "1 worker process"
        return f"`conveyor worker --processes {processes}` (forked after start-up)"

    async def prepare(self) -> None:
        await super().prepare()
        self._app = Conveyor(database_url=self.database_url, auto_migrate=True, log_level="WARNING")
        self._tasks = register(self._app)
        await self._app.store()

    async def cleanup(self) -> None:
        if self._app is not None:
            await self._app.close()
            self._app = None
        await super().cleanup()

    @property
    def _ready(self) -> tuple[Conveyor, Noop, Sleep]:
        assert self._app is not None, "prepare() first"
        assert self._tasks is not None
        return self._app, *self._tasks

    async def enqueue_noops(self, n: int) -> None:
        conveyor, noop, _ = self._ready
        for start in range(0, n, BULK_CHUNK):
            await conveyor.enqueue_many([noop.job() for _ in range(min(BULK_CHUNK, n - start))])

    async def enqueue_noop(self) -> None:
        _, noop, _ = self._ready
        await noop.enqueue()

    async def enqueue_sleeps(self, n: int, seconds: float) -> None:
        conveyor, _, sleep = self._ready
        for start in range(0, n, BULK_CHUNK):
            await conveyor.enqueue_many([sleep.job(seconds) for _ in range(min(BULK_CHUNK, n - start))])

    def worker_spec(self, profile: str, concurrency: int) -> WorkerSpec:
        general = (self.options["processes"], self.options["concurrency"])
        processes, slots = general if profile == "general" else (1, concurrency)
        # One command, as a user runs several worker processes on one machine: it forks them once
        # it has started, so they all start claiming together.
        argv = python_module(
            "conveyor",
            "worker",
            "--app",
            "benchmarks.systems.conveyor_common:app",
            "--concurrency",
            str(slots),
            "--processes",
            str(processes),
        )
        env = {
            "CONVEYOR_DATABASE_URL": self.database_url,
            "CONVEYOR_LOG_LEVEL": "WARNING",
            "CONVEYOR_CLAIM_BATCH_SIZE": str(self.options["claim_batch"]),
        }
        return WorkerSpec(argv, env)
