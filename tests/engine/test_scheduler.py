"""The scheduler on a real database, driven by a fake clock: each tick stored once however many
workers look, restarts that neither fire a tick again nor lose one, and each missed-tick policy."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Unpack

from tests.api.support import FakeClock
from tests.engine.conftest import running_worker
from tests.support.waiting import eventually

from conveyor import Conveyor, Job, JobState
from conveyor.engine.scheduler import Scheduler
from conveyor.schedules import Schedule, ScheduleOptions
from conveyor.testing import drain, enqueued_jobs

START = datetime(2026, 1, 1, 12, 0, 1, tzinfo=UTC)
"""A second after a tick of every schedule here."""
MINUTE = timedelta(minutes=1)


def at(hour: int, minute: int, day: int = 1) -> datetime:
    return datetime(2026, 1, day, hour, minute, tzinfo=UTC)


def report_every_five_minutes(app: Conveyor, **options: Unpack[ScheduleOptions]) -> Schedule:
    @app.task
    async def report() -> None: ...

    return app.schedule(report, "*/5 * * * *", **options)


def new_worker(app: Conveyor) -> Scheduler:
    """The scheduler of a worker that has just started: it remembers nothing."""
    return Scheduler(app, list(app.schedules.values()))


async def restarted(
    app: Conveyor, restarted_at: datetime, **options: Unpack[ScheduleOptions]
) -> tuple[Schedule, list[Job]]:
    """A worker stores the tick just before START, then every worker stops; at ``restarted_at`` a
    new one starts. Returns the schedule and what the new worker enqueued on its first look."""
    clock = FakeClock(START)
    app.clock = clock
    schedule = report_every_five_minutes(app, **options)
    await new_worker(app).enqueue_due()
    clock.now = restarted_at
    return schedule, await new_worker(app).enqueue_due()


async def stored_ticks(app: Conveyor, schedule: Schedule) -> list[datetime]:
    jobs = await enqueued_jobs(app, schedule.task)
    ticks = [schedule.tick_of(job.idempotency_key or "") for job in jobs]
    assert None not in ticks, "every job of the schedule carries its tick's key"
    return sorted(tick for tick in ticks if tick is not None)


async def has_jobs(app: Conveyor, task: str) -> bool:
    return bool(await enqueued_jobs(app, task))


def run_ats(jobs: list[Job]) -> list[datetime]:
    return [job.run_at for job in jobs]


async def test_workers_looking_at_the_same_moment_store_each_tick_once(app: Conveyor) -> None:
    app.clock = FakeClock(START)
    schedule = report_every_five_minutes(app)

    first = await new_worker(app).enqueue_due()
    together = await asyncio.gather(*(new_worker(app).enqueue_due() for _ in range(5)))

    assert run_ats(first) == [at(12, 0)], "the tick just passed, run as due then"
    assert together == [[]] * 5, "the others found it stored"
    assert await stored_ticks(app, schedule) == [at(12, 0)]
    assert first[0].idempotency_key == "conveyor:schedule:report:2026-01-01T12:00:00Z"
    assert first[0].state is JobState.QUEUED


async def test_a_tick_whose_job_already_finished_is_not_enqueued_again(app: Conveyor) -> None:
    app.clock = FakeClock(START)
    schedule = report_every_five_minutes(app)
    (job,) = await new_worker(app).enqueue_due()
    await drain(app)
    assert (await app.get_job(job.id)).state is JobState.SUCCEEDED

    again = await new_worker(app).enqueue_due()

    assert again == []
    assert await stored_ticks(app, schedule) == [at(12, 0)]


async def test_one_worker_enqueues_each_tick_as_it_comes(app: Conveyor) -> None:
    clock = FakeClock(START)
    app.clock = clock
    schedule = report_every_five_minutes(app)
    worker = new_worker(app)

    looks = []
    for _ in range(12):
        looks.append(run_ats(await worker.enqueue_due()))
        clock.now += MINUTE

    assert looks == [[at(12, 0)], [], [], [], [], [at(12, 5)], [], [], [], [], [at(12, 10)], []]
    assert await stored_ticks(app, schedule) == [at(12, 0), at(12, 5), at(12, 10)]


async def test_skip_after_an_outage_enqueues_only_the_latest_tick(app: Conveyor) -> None:
    schedule, after_restart = await restarted(app, START + timedelta(hours=1))

    assert run_ats(after_restart) == [at(13, 0)]
    assert await stored_ticks(app, schedule) == [at(12, 0), at(13, 0)], "the eleven ticks between were skipped"


async def test_skip_leaves_a_tick_later_than_its_grace_for_the_next_one(app: Conveyor) -> None:
    clock = FakeClock(at(9, 30))
    app.clock = clock

    @app.periodic("0 9 * * *", grace=600)
    async def morning() -> None: ...

    worker = new_worker(app)
    late = await worker.enqueue_due()
    clock.now = at(9, 0, day=2) + timedelta(seconds=1)
    on_time = await worker.enqueue_due()

    assert late == [], "half an hour after 09:00 is past the ten minutes' grace"
    assert run_ats(on_time) == [at(9, 0, day=2)]


async def test_a_restarted_worker_catches_up_from_the_latest_tick_in_the_database(app: Conveyor) -> None:
    schedule, caught_up = await restarted(app, at(12, 31), missed="catch_up")
    another = await new_worker(app).enqueue_due()

    assert run_ats(caught_up) == [at(12, minute) for minute in (5, 10, 15, 20, 25, 30)], "oldest first"
    assert another == []
    assert await stored_ticks(app, schedule) == [at(12, minute) for minute in range(0, 31, 5)]


async def test_catch_up_after_an_outage_longer_than_its_limit_enqueues_the_latest_ticks(app: Conveyor) -> None:
    schedule, caught_up = await restarted(app, at(14, 1), missed="catch_up", catch_up_limit=3)

    assert run_ats(caught_up) == [at(13, 50), at(13, 55), at(14, 0)]
    assert await stored_ticks(app, schedule) == [at(12, 0), at(13, 50), at(13, 55), at(14, 0)]


async def test_catch_up_of_a_new_schedule_has_nothing_to_catch_up(app: Conveyor) -> None:
    app.clock = FakeClock(at(12, 31))
    schedule = report_every_five_minutes(app, missed="catch_up")

    first = await new_worker(app).enqueue_due()

    assert run_ats(first) == [at(12, 30)]
    assert await stored_ticks(app, schedule) == [at(12, 30)]


async def test_ticks_older_than_the_retention_period_are_never_enqueued(app: Conveyor) -> None:
    app.settings = app.settings.model_copy(update={"retention_seconds": 600})

    schedule, caught_up = await restarted(app, at(13, 1), missed="catch_up")

    assert run_ats(caught_up) == [at(12, 55), at(13, 0)], "their jobs could have been pruned already"
    assert await stored_ticks(app, schedule) == [at(12, 0), at(12, 55), at(13, 0)]


async def test_a_task_with_a_unique_key_drops_the_ticks_that_come_while_its_job_is_unfinished(app: Conveyor) -> None:
    clock = FakeClock(START)
    app.clock = clock

    @app.periodic("*/5 * * * *")
    @app.task(unique_key=lambda: "report")
    async def report() -> None: ...

    worker = new_worker(app)
    first = await worker.enqueue_due()
    clock.now += timedelta(minutes=5)
    overlapping = await worker.enqueue_due()
    await drain(app)
    clock.now += timedelta(minutes=5)
    after = await worker.enqueue_due()

    assert run_ats(first) == [at(12, 0)]
    assert overlapping == [], "12:00's job had not run yet"
    assert run_ats(after) == [at(12, 10)]
    assert await stored_ticks(app, app.schedules["report"]) == [at(12, 0), at(12, 10)]


async def test_two_workers_through_the_night_the_clocks_go_back_store_each_tick_once(app: Conveyor) -> None:
    # Paris goes from 03:00 CEST back to 02:00 CET on 25 October 2026, at 01:00 UTC.
    fall_back = datetime(2026, 10, 25, 1, 0, tzinfo=UTC)
    clock = FakeClock(fall_back - timedelta(hours=3, seconds=-5))
    app.clock = clock

    @app.periodic("0 * * * *", timezone="Europe/Paris")
    async def hourly() -> None: ...

    @app.periodic("30 2 * * *", timezone="Europe/Paris")
    async def nightly() -> None: ...

    workers = [new_worker(app), new_worker(app)]
    while clock.now < fall_back + timedelta(hours=3):
        for worker in workers:
            await worker.enqueue_due()
        clock.now += MINUTE

    hours = [fall_back + timedelta(hours=hours) for hours in range(-3, 3)]
    assert await stored_ticks(app, app.schedules["hourly"]) == hours, "every real hour, 02:00 twice on the wall"
    assert await stored_ticks(app, app.schedules["nightly"]) == [fall_back - timedelta(minutes=30)], "02:30 once"


async def test_a_worker_makes_the_ticks_of_the_schedules_on_its_queues_only(app: Conveyor) -> None:
    app.clock = FakeClock(START)

    @app.periodic("*/5 * * * *")
    async def cleanup() -> None: ...

    @app.periodic("*/5 * * * *", queue="reports")
    async def report() -> None: ...

    async with running_worker(app, queues=["default"]):
        await eventually(lambda: has_jobs(app, "cleanup"))

    assert await enqueued_jobs(app, "report") == [], "no worker serves the reports queue"


async def test_a_worker_told_not_to_and_a_drain_make_no_ticks(app: Conveyor) -> None:
    app.clock = FakeClock(START)

    @app.periodic("*/5 * * * *")
    async def cleanup() -> None: ...

    @app.task
    async def ping() -> str:
        return "pong"

    await drain(app)
    async with running_worker(app, schedules=False):
        pinged = await ping.enqueue()
        done = await app.wait_for_job(pinged.id, timeout=30)

    assert done.state is JobState.SUCCEEDED, "the worker ran jobs all along"
    assert await enqueued_jobs(app, "cleanup") == []
