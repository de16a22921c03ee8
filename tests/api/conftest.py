"""The HTTP API in-process: a fresh Conveyor on its own SQLite file, its app with the lifespan
running (so the embedded worker really runs jobs), and an httpx client over ASGI."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from tests.api.support import Api, Controls, register_tasks, serve

from conveyor import Conveyor


@pytest.fixture
def controls() -> Controls:
    return Controls()


@pytest.fixture
def make_conveyor(database_url: str, controls: Controls) -> Callable[..., Conveyor]:
    """A fresh Conveyor with the test tasks, fast timings, and any settings overridden."""

    def make(**overrides: Any) -> Conveyor:
        settings: dict[str, Any] = {
            "poll_interval_seconds": 0.05,
            "lease_seconds": 5,
            "shutdown_grace_seconds": 0.5,
            "cpu_workers": 1,
            "queues": ("default", "emails"),
        }
        conveyor = Conveyor(database_url=database_url, **(settings | overrides))
        register_tasks(conveyor, controls)
        return conveyor

    return make


@pytest.fixture
async def conveyor(make_conveyor: Callable[..., Conveyor]) -> AsyncIterator[Conveyor]:
    conveyor = make_conveyor()
    yield conveyor
    await conveyor.close()  # already closed by a served app's shutdown; not if a test never served it


@pytest.fixture
async def api(conveyor: Conveyor, controls: Controls) -> AsyncIterator[Api]:
    """The API with its embedded worker running."""
    async with serve(conveyor) as served:
        yield served
        controls.release.set()  # held jobs end now, so shutdown does not wait out the grace period


@pytest.fixture
async def idle_api(conveyor: Conveyor) -> AsyncIterator[Api]:
    """The API with no worker: jobs stay as submitted."""
    async with serve(conveyor, run_worker=False) as served:
        yield served
