"""Unique jobs: at most one unfinished job per key."""

from __future__ import annotations

import asyncio

from conveyor import Conveyor, JobState
from conveyor.testing import drain


async def test_a_second_enqueue_with_the_same_key_returns_the_unfinished_job(app: Conveyor) -> None:
    @app.task
    async def refresh(account: int) -> int:
        return account

    first = await refresh.using(unique_key="account:7").enqueue(7)
    again = await refresh.using(unique_key="account:7").enqueue(7)
    other = await refresh.using(unique_key="account:8").enqueue(8)
    together = await app.enqueue_many([refresh.using(unique_key="account:9").job(9) for _ in range(3)])

    assert again.id == first.id
    assert other.id != first.id
    assert len({job.id for job in together}) == 1, "one batch, one job per key"
    assert len((await app.list_jobs()).jobs) == 3


async def test_once_the_job_finished_the_key_is_free_again(app: Conveyor) -> None:
    @app.task(unique_key=lambda account: f"account:{account}")
    async def refresh(account: int) -> int:
        return account

    first = await refresh.enqueue(7)
    await drain(app)
    assert (await app.get_job(first.id)).state is JobState.SUCCEEDED
    second = await refresh.enqueue(7)
    concurrent = await asyncio.gather(*(refresh.enqueue(7) for _ in range(5)))

    assert second.id != first.id, "a finished job no longer holds its key"
    assert {job.id for job in concurrent} == {second.id}
    assert second.unique_key == "account:7"
