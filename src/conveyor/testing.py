"""Helpers for your own tests: run the jobs you enqueued, right here, then assert on them."""

from __future__ import annotations

from collections.abc import Sequence

from conveyor.app import Conveyor
from conveyor.engine.worker import Worker, WorkerStats
from conveyor.jobs import Job, JobState


async def drain(app: Conveyor, *, queues: Sequence[str] | None = None, concurrency: int | None = None) -> WorkerStats:
    """Run a worker in this process until no job is due and none is running, then return.

    Jobs scheduled for later (delays, retries with backoff) are left for when they are due.
    """
    return await Worker(app, queues=queues or tuple(app.settings.queues), concurrency=concurrency).run(drain=True)


async def enqueued_jobs(app: Conveyor, task: str | None = None, *, states: Sequence[JobState] = ()) -> list[Job]:
    """Every job of ``task`` (or of any task) in the given states, oldest first."""
    found: list[Job] = []
    cursor = None
    while True:
        page = await app.list_jobs(task=task, states=states, cursor=cursor, limit=500)
        found.extend(page.jobs)
        if page.next_cursor is None:
            return list(reversed(found))
        cursor = page.next_cursor
