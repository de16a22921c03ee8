"""Long-polls on SQLite learn of jobs finished by another process from its commit, not a timer."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator

import pytest
from tests.storage.test_store import T0, ack_for, claim_one, insert, new

from conveyor.api.watch import JobWatcher
from conveyor.jobs import JobState
from conveyor.settings import Settings
from conveyor.storage import Store, open_store

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="inotify is Linux's")


@pytest.fixture
async def stores(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[Store, Store]]:
    """The API server's store and another process's: one SQLite file, connections of their own."""
    url = f"sqlite:///{tmp_path_factory.mktemp('watch') / 'jobs.db'}"
    server = await open_store(Settings(database_url=url, auto_migrate=True))
    other = await open_store(Settings(database_url=url))
    yield server, other
    await other.close()
    await server.close()


async def test_a_long_poll_is_answered_on_the_commit_that_finishes_its_job_elsewhere(
    stores: tuple[Store, Store],
) -> None:
    server, other = stores
    # Its timer would look only after a minute: the commit is what must wake it.
    watcher = JobWatcher(server, interval=60)
    watcher.start()
    try:
        (job,) = await insert(server, new())
        waiting = asyncio.ensure_future(watcher.wait(job.id, timeout=60))
        running = await claim_one(other, now=T0)
        await asyncio.sleep(0)
        assert not waiting.done(), "the job has not finished yet"

        await other.ack_jobs([ack_for(running, JobState.SUCCEEDED, now=T0)], now=T0)

        await asyncio.wait_for(waiting, 10)
        finished = await server.get_job(job.id)
        assert finished is not None
        assert finished.state is JobState.SUCCEEDED
    finally:
        await watcher.stop()
