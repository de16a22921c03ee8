"""GET /schedules: each periodic task with its cron, zone, policy, next run and latest tick's job."""

from __future__ import annotations

from datetime import UTC, datetime

from tests.api.support import Api, FakeClock, add_token, assert_envelope, bearer, serve

from conveyor import Conveyor
from conveyor.api.schemas import SchedulesPublic
from conveyor.engine.scheduler import Scheduler
from conveyor.tokens import Scope

# A Monday, five seconds after 09:00 in Paris (08:00 UTC).
NOW = datetime(2026, 1, 5, 8, 0, 5, tzinfo=UTC)


def add_schedules(conveyor: Conveyor) -> None:
    conveyor.schedule("add", "0 9 * * 1-5", timezone="Europe/Paris", name="morning-sum", kwargs={"a": 1, "b": 2})
    conveyor.schedule(
        "shout", "* * * * * */10", args=["tick"], missed="catch_up", catch_up_limit=5, grace=30, priority=2
    )


async def test_schedules_are_listed_by_name_with_their_next_run(conveyor: Conveyor) -> None:
    conveyor.clock = FakeClock(NOW)
    add_schedules(conveyor)
    async with serve(conveyor, run_worker=False) as served:
        response = await served.client.get("/schedules")

    assert response.status_code == 200, response.text
    listed = SchedulesPublic.model_validate(response.json()).schedules
    assert [schedule.name for schedule in listed] == ["morning-sum", "shout"]
    morning, shout = listed
    assert response.json()["schedules"][0] == {
        "name": "morning-sum",
        "task": "add",
        "cron": "0 9 * * 1-5",
        "timezone": "Europe/Paris",
        "queue": "default",
        "priority": 0,
        "args": [],
        "kwargs": {"a": 1, "b": 2},
        "missed": "skip",
        "catch_up_limit": 100,
        "grace_seconds": 600.0,
        "next_run_at": "2026-01-06T08:00:00Z",
        "last_tick_at": None,
        "last_job_id": None,
    }
    assert morning.next_run_at == datetime(2026, 1, 6, 8, 0, tzinfo=UTC), "tomorrow 09:00 in Paris"
    assert (shout.queue, shout.priority, shout.args) == ("emails", 2, ["tick"]), "the task's queue"
    assert (shout.missed, shout.catch_up_limit, shout.grace_seconds) == ("catch_up", 5, 30.0)
    assert shout.next_run_at == datetime(2026, 1, 5, 8, 0, 10, tzinfo=UTC)


async def test_a_schedule_shows_the_job_of_its_latest_tick(conveyor: Conveyor) -> None:
    conveyor.clock = FakeClock(NOW)
    add_schedules(conveyor)
    async with serve(conveyor, run_worker=False) as served:
        enqueued = await Scheduler(conveyor, list(conveyor.schedules.values())).enqueue_due()
        response = await served.client.get("/schedules")

    by_name = {schedule.name: schedule for schedule in SchedulesPublic.model_validate(response.json()).schedules}
    jobs = {job.task: job for job in enqueued}
    assert by_name["morning-sum"].last_tick_at == datetime(2026, 1, 5, 8, 0, tzinfo=UTC)
    assert by_name["morning-sum"].last_job_id == jobs["add"].id
    assert by_name["shout"].last_tick_at == datetime(2026, 1, 5, 8, 0, 0, tzinfo=UTC)
    assert by_name["shout"].last_job_id == jobs["shout"].id


async def test_an_app_without_schedules_lists_none(idle_api: Api) -> None:
    response = await idle_api.client.get("/schedules")

    assert response.status_code == 200
    assert response.json() == {"schedules": []}


async def test_listing_schedules_needs_the_read_scope(conveyor: Conveyor) -> None:
    add_schedules(conveyor)
    _, reader = await add_token(conveyor, Scope.JOBS_READ)
    _, writer = await add_token(conveyor, Scope.JOBS_WRITE)
    async with serve(conveyor, run_worker=False) as served:
        anonymous = await served.client.get("/schedules")
        read = await served.client.get("/schedules", headers=bearer(reader))
        written = await served.client.get("/schedules", headers=bearer(writer))

    assert_envelope(anonymous, 401, "unauthorized")
    assert read.status_code == 200
    assert_envelope(written, 403, "forbidden")
