from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from typing import Any

import pytest

from conveyor import Conveyor, Worker


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


@pytest.fixture
def database_url(backend_url: str) -> str:
    """Every test here runs on SQLite and on PostgreSQL."""
    return backend_url
