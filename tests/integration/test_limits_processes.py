"""Limits held by real worker processes together, on SQLite and on PostgreSQL.

Each worker could run far more than the limit on its own; only the claim's shared bookkeeping
keeps the fleet within it.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from tests.support import tasks as support
from tests.support.processes import WorkerProcess
from tests.support.waiting import eventually

from conveyor import Conveyor, Job, JobState
from conveyor.testing import enqueued_jobs

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def start_fleet(
    fleet: list[WorkerProcess], tmp_path: Path, database_url: str, count: int, **settings: str
) -> list[WorkerProcess]:
    workers = [WorkerProcess(tmp_path / f"worker-{index}.log", database_url, **settings) for index in range(count)]
    fleet.extend(workers)
    for worker in workers:
        worker.wait_started()
    return workers


def started_line(worker: WorkerProcess) -> dict[str, object]:
    return worker.wait_for_event(lambda event: event.get("event") == "worker.started")


async def all_succeeded(app: Conveyor, jobs: Sequence[Job]) -> list[Job] | None:
    current = [await app.get_job(job.id) for job in jobs]
    return current if all(job.state is JobState.SUCCEEDED for job in current) else None


def most_at_once(intervals: Sequence[tuple[float, float]]) -> int:
    """The most intervals open at one moment; one that ends as another starts does not overlap it."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    open_now = peak = 0
    for _, change in events:
        open_now += change
        peak = max(peak, open_now)
    return peak


def most_in_any_span(moments: Sequence[datetime], span: timedelta) -> int:
    ordered = sorted(moments)
    return max(bisect.bisect_left(ordered, first + span) - index for index, first in enumerate(ordered))


async def test_three_workers_never_run_more_jobs_of_a_limited_queue_at_once_than_its_limit(
    tmp_path: Path, database_url: str, effects_path: Path, fleet: list[WorkerProcess], app: Conveyor
) -> None:
    timed = app.task(name="timed", queue="limited")(support.timed.fn)
    # One job at a time each: three workers could run three at once, so only the shared limit keeps it to two.
    workers = start_fleet(fleet, tmp_path, database_url, 3, queues="limited", concurrency="1", queue_limits="limited=2")
    assert {started_line(worker)["queue_limits"] == {"limited": 2} for worker in workers} == {True}

    jobs = await app.enqueue_many([timed.job(0.2) for _ in range(12)])
    done = await eventually(lambda: all_succeeded(app, jobs), timeout=120, interval=0.1)
    assert [worker.stop() for worker in workers] == [0, 0, 0]

    # The task records its own start and end: both fall inside the time its job was running.
    moments: dict[str, dict[str, float]] = {}
    for line in support.read_effects(effects_path):
        kind, job_id, at = line.split()
        moments.setdefault(job_id, {})[kind] = float(at)
    intervals = [(moment["start"], moment["end"]) for moment in moments.values()]
    assert len(intervals) == len(jobs), "each job ran once"
    assert most_at_once(intervals) == 2, "never more than the limit, and the limit was used"
    assert len({job.history[0].worker for job in done}) > 1, "more than one worker took a share"


async def test_a_rate_limit_holds_across_three_workers_while_the_rest_of_the_queue_flows(
    tmp_path: Path, database_url: str, effects_path: Path, fleet: list[WorkerProcess], app: Conveyor
) -> None:
    rated = app.task(name="rated", rate_limit="5/s")(support.rated.fn)
    effect = app.task(name="effect")(support.effect.fn)
    workers = start_fleet(fleet, tmp_path, database_url, 3, app_path="tests.support.tasks:rated_app", concurrency="10")
    assert {started_line(worker)["rate_limits"] == {"rated": "5/s"} for worker in workers} == {True}

    # The limited jobs go first: every claim meets them before the others.
    limited = await app.enqueue_many([rated.job(n) for n in range(20)])
    others = await app.enqueue_many([effect.job(n) for n in range(20)])
    await eventually(lambda: all_succeeded(app, [*limited, *others]), timeout=120, interval=0.1)
    assert [worker.stop() for worker in workers] == [0, 0, 0]

    # The limit governs the claim, which records when each attempt started.
    rated_starts = sorted(job.attempted_at for job in await enqueued_jobs(app, "rated") if job.attempted_at)
    other_starts = [job.attempted_at for job in await enqueued_jobs(app, "effect") if job.attempted_at]
    assert len(rated_starts) == 20
    assert {job.attempt for job in await enqueued_jobs(app, "rated")} == {1}, "held back without spending attempts"
    assert most_in_any_span(rated_starts, timedelta(seconds=1)) == 5, "never more than 5 in a second, and 5 at best"
    assert rated_starts[-1] - rated_starts[0] >= timedelta(seconds=3)
    assert max(other_starts) < rated_starts[5], "the other jobs did not wait behind the limited ones"
    assert len(support.read_effects(effects_path)) == 40, "each job ran once"
