"""Cancelling running jobs: async at once, sync and CPU after a grace period; never retried."""

from __future__ import annotations

import asyncio
import threading

from tests.engine.conftest import lingering_task, running_worker
from tests.support import tasks as support

from conveyor import CONTEXT, Conveyor, JobContext, JobState, Outcome


async def test_cancelling_a_running_async_job_stops_it_within_a_second_and_runs_its_cleanup(
    database_url: str,
) -> None:
    app = Conveyor(database_url=database_url, cancel_check_seconds=0.1, poll_interval_seconds=0.05)
    long_running = lingering_task(app, max_attempts=5)

    try:
        job = await long_running.task.enqueue()
        async with running_worker(app):
            await asyncio.wait_for(long_running.entered.wait(), 10)
            asked = await app.cancel_job(job.id)
            assert asked.state is JobState.RUNNING
            assert asked.cancel_requested_at is not None
            await asyncio.wait_for(long_running.cleaned_up.wait(), 1.5)
            final = await app.wait_for_job(job.id, timeout=10)
        assert (final.state, final.attempt) == (JobState.CANCELLED, 1), "cancelled, not retried"
        assert [record.outcome for record in final.history] == [Outcome.CANCELLED]
        assert final.finished_at is not None
    finally:
        await app.close()


async def test_a_sync_task_learns_of_the_cancel_through_its_context(database_url: str) -> None:
    app = Conveyor(database_url=database_url, cancel_check_seconds=0.1, poll_interval_seconds=0.05)
    entered = threading.Event()
    noticed = threading.Event()

    @app.task
    def careful(ctx: JobContext = CONTEXT) -> str:
        entered.set()
        while not ctx.cancel_requested:
            if noticed.wait(0.01):
                break
        noticed.set()
        return "stopped early"

    try:
        job = await careful.enqueue()
        async with running_worker(app):
            await asyncio.to_thread(entered.wait, 10)
            await app.cancel_job(job.id)
            final = await app.wait_for_job(job.id, timeout=10)
        assert noticed.is_set()
        assert final.state is JobState.CANCELLED
        assert final.result is None
    finally:
        await app.close()


async def test_a_cancelled_cpu_task_has_its_process_killed_after_the_grace_period(database_url: str) -> None:
    app = Conveyor(
        database_url=database_url, cancel_check_seconds=0.1, cancel_grace_seconds=0.2, poll_interval_seconds=0.05
    )
    spin = app.task(name="spin", cpu=True, max_attempts=3)(support.cpu_spin.fn)
    square = app.task(name="square", cpu=True)(support.cpu_square.fn)
    try:
        job = await spin.enqueue(120)
        async with running_worker(app):

            async def running() -> bool:
                return (await app.get_job(job.id)).state is JobState.RUNNING

            while not await running():
                await asyncio.sleep(0.05)
            await app.cancel_job(job.id)
            final = await app.wait_for_job(job.id, timeout=30)
            after = await square.enqueue(6)
            after_final = await app.wait_for_job(after.id, timeout=60)
        assert (final.state, final.attempt) == (JobState.CANCELLED, 1)
        assert after_final.result == 36, "the pool replaced the killed process"
    finally:
        await app.close()


async def test_a_cancel_that_races_a_failure_still_ends_cancelled(app: Conveyor) -> None:
    release = asyncio.Event()

    @app.task(max_attempts=5)
    async def fails_later() -> None:
        await release.wait()
        raise RuntimeError("failed on its own")

    job = await fails_later.enqueue()
    store = await app.store()
    async with running_worker(app, concurrency=1):
        while (await app.get_job(job.id)).state is not JobState.RUNNING:
            await asyncio.sleep(0.02)
        # Ask to stop, but let the attempt fail before any worker notices the request.
        await store.cancel_job(job.id, now=app.clock())
        release.set()
        final = await app.wait_for_job(job.id, timeout=10)
    assert final.state is JobState.CANCELLED, "the cancel wins over the retry"
    assert final.attempt == 1
