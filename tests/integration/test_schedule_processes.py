"""Three real worker processes on one database, each running the scheduler of a per-second
schedule: every tick is stored once and runs once."""

from __future__ import annotations

import collections
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from tests.support import tasks as support
from tests.support.processes import WorkerProcess
from tests.support.waiting import eventually

from conveyor import Conveyor, JobState
from conveyor.testing import enqueued_jobs

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TICKS = 6


@pytest.fixture
def workers(tmp_path: Path, database_url: str) -> Iterator[list[WorkerProcess]]:
    """Three workers serving the ``ticks`` queue; any left running are killed at the end."""
    started = [
        WorkerProcess(tmp_path / f"worker-{n}.log", database_url, ["--queues", "ticks"], poll_interval_seconds="0.05")
        for n in range(3)
    ]
    yield started
    for worker in started:
        worker.kill()


async def test_three_workers_enqueue_each_tick_of_a_per_second_schedule_once_and_run_it_once(
    database_url: str, effects_path: Path, workers: list[WorkerProcess], app: Conveyor
) -> None:
    schedule = support.app.schedules["every_second"]
    for worker in workers:
        worker.wait_started()

    await eventually(lambda: _succeeded_at_least(app, TICKS), timeout=60)
    for worker in workers:
        assert worker.stop() == 0

    jobs = await enqueued_jobs(app, "every_second")
    per_tick: collections.Counter[datetime] = collections.Counter()
    for job in jobs:
        tick = schedule.tick_of(job.idempotency_key or "")
        assert tick is not None, f"every job carries its tick's key, not {job.idempotency_key!r}"
        assert job.run_at == tick, "and is due at its tick"
        per_tick[tick] += 1
    assert set(per_tick.values()) == {1}, "one job per tick"
    span = max(per_tick) - min(per_tick)
    assert len(per_tick) == span // timedelta(seconds=1) + 1, "no tick lost between the first and the last"

    runs = collections.Counter(
        line.split()[1] for line in support.read_effects(effects_path) if line.startswith("tick")
    )
    succeeded = {job.id for job in jobs if job.state is JobState.SUCCEEDED}
    assert len(succeeded) >= TICKS
    assert set(runs) == succeeded, "every finished tick ran, and no other"
    assert set(runs.values()) == {1}, "and ran once"

    enqueued_by = collections.Counter(
        event["job_id"] for worker in workers for event in worker.events() if event.get("event") == "schedule.enqueued"
    )
    assert set(enqueued_by) == {job.id for job in jobs}, "each stored tick was stored by one worker's insert"
    assert set(enqueued_by.values()) == {1}
    started = [event for worker in workers for event in worker.events() if event.get("event") == "scheduler.started"]
    assert len(started) == 3, "all three looked for due ticks"


async def _succeeded_at_least(app: Conveyor, count: int) -> bool:
    jobs = await enqueued_jobs(app, "every_second", states=[JobState.SUCCEEDED])
    return len(jobs) >= count
