"""Progress reported from inside a task, stored at a bounded rate, readable while it runs."""

from __future__ import annotations

import asyncio
import threading

import pytest
from tests.engine.conftest import running_worker

from conveyor import CONTEXT, Conveyor, JobContext, JobState


async def test_progress_reported_by_an_async_task_is_stored_while_it_runs(database_url: str) -> None:
    app = Conveyor(database_url=database_url, progress_write_seconds=0.05, poll_interval_seconds=0.05)
    halfway = asyncio.Event()
    finish = asyncio.Event()

    @app.task
    async def import_rows(ctx: JobContext = CONTEXT) -> int:
        for done in range(1, 101):
            ctx.progress(done / 200, f"row {done}")  # many reports: only the latest is written
        halfway.set()
        await finish.wait()
        return 100

    try:
        job = await import_rows.enqueue()
        async with running_worker(app):
            await asyncio.wait_for(halfway.wait(), 10)

            async def reported() -> dict | None:
                return (await app.get_job(job.id)).progress

            while (progress := await reported()) is None:
                await asyncio.sleep(0.02)
            finish.set()
            final = await app.wait_for_job(job.id, timeout=10)
        assert progress["fraction"] == 0.5
        assert progress["message"] == "row 100"
        assert final.state is JobState.SUCCEEDED
    finally:
        await app.close()


async def test_a_sync_task_reports_progress_from_its_thread(database_url: str) -> None:
    app = Conveyor(database_url=database_url, progress_write_seconds=0.05, poll_interval_seconds=0.05)
    reported = threading.Event()
    release = threading.Event()

    @app.task
    def crunch(ctx: JobContext = CONTEXT) -> None:
        ctx.progress(0.25, "a quarter")
        reported.set()
        release.wait(10)

    try:
        job = await crunch.enqueue()
        async with running_worker(app):
            await asyncio.to_thread(reported.wait, 10)
            while (await app.get_job(job.id)).progress is None:
                await asyncio.sleep(0.02)
            release.set()
            final = await app.wait_for_job(job.id, timeout=10)
        assert final.progress is not None
        assert (final.progress["fraction"], final.progress["message"]) == (0.25, "a quarter")
    finally:
        release.set()
        await app.close()


def test_progress_outside_zero_to_one_is_refused() -> None:
    context = JobContext(job_id="j", task="t", queue="q", attempt=1, max_attempts=1, progress_sink=lambda *_: None)
    with pytest.raises(ValueError, match="fraction"):
        context.progress(1.5)
    with pytest.raises(RuntimeError, match="cpu=True"):
        JobContext(job_id="j", task="t", queue="q", attempt=1, max_attempts=1).progress(0.5)
