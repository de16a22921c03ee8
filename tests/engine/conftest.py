from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import pytest

from conveyor import Conveyor, Task, Worker


@contextlib.asynccontextmanager
async def running_worker(app: Conveyor, **options: Any) -> AsyncGenerator[Worker]:
    """A worker running in this event loop for the duration of the block, then stopped."""
    worker = Worker(app, **options)
    run = asyncio.create_task(worker.run())
    started = asyncio.create_task(worker.started.wait())
    done, _ = await asyncio.wait({run, started}, return_when=asyncio.FIRST_COMPLETED)
    if run in done:
        started.cancel()
        run.result()
    try:
        yield worker
    finally:
        worker.stop()
        await asyncio.wait_for(run, 30)


@dataclass
class Lingering:
    """A task that marks its start, then sleeps for a minute, marking it if cancelled meanwhile."""

    task: Task[[], Any]
    entered: asyncio.Event
    cleaned_up: asyncio.Event


def lingering_task(app: Conveyor, **options: Any) -> Lingering:
    entered, cleaned_up = asyncio.Event(), asyncio.Event()

    @app.task(name="linger", **options)
    async def linger() -> None:
        entered.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cleaned_up.set()
            raise

    return Lingering(linger, entered, cleaned_up)


@pytest.fixture
def database_url(backend_url: str) -> str:
    """Every test here runs on SQLite and on PostgreSQL."""
    return backend_url
