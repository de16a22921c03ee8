"""Ticks of cron schedules as pure functions of a clock: fields, time zones, daylight saving time,
and which ticks are due under each missed-tick policy."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import get_args
from zoneinfo import ZoneInfo

import pytest
from croniter import croniter
from hypothesis import given, settings
from hypothesis import strategies as st

from conveyor import Conveyor
from conveyor.errors import UnknownTaskError
from conveyor.schedules import KEY_PREFIX, MAX_NAME_LENGTH, Cron, Missed, Schedule

PARIS = ZoneInfo("Europe/Paris")
# 2026 in Paris: clocks jump from 02:00 CET to 03:00 CEST on 29 March (at 01:00 UTC), and go back
# from 03:00 CEST to 02:00 CET on 25 October (at 01:00 UTC).
SPRING_FORWARD = datetime(2026, 3, 29, 1, 0, tzinfo=UTC)
FALL_BACK = datetime(2026, 10, 25, 1, 0, tzinfo=UTC)


def utc(*fields: int) -> datetime:
    return datetime(*fields, tzinfo=UTC)


def paris(*fields: int, fold: int = 0) -> datetime:
    """A Paris wall time (``fold=1``: its second pass when the clock went back), in UTC."""
    return datetime(*fields, tzinfo=PARIS, fold=fold).astimezone(UTC)


def ticks(cron: Cron, after: datetime, count: int) -> list[datetime]:
    found = []
    for _ in range(count):
        after = cron.next_after(after)
        found.append(after)
    return found


def schedule(
    expression: str,
    timezone: str = "UTC",
    *,
    missed: Missed = "skip",
    catch_up_limit: int = 100,
    grace: timedelta = timedelta(minutes=10),
) -> Schedule:
    return Schedule(
        name="report",
        task="report",
        cron=Cron(expression, timezone),
        queue="default",
        priority=0,
        args=[],
        kwargs={},
        missed=missed,
        catch_up_limit=catch_up_limit,
        grace=grace,
    )


# -- reading expressions -----------------------------------------------------------------------


def test_five_fields_fire_on_the_minute_and_a_sixth_adds_seconds() -> None:
    start = utc(2026, 1, 1, 12, 0, 0)

    assert ticks(Cron("*/15 * * * *"), start, 3) == [
        utc(2026, 1, 1, 12, 15),
        utc(2026, 1, 1, 12, 30),
        utc(2026, 1, 1, 12, 45),
    ]
    assert ticks(Cron("* * * * * */20"), start, 3) == [
        utc(2026, 1, 1, 12, 0, 20),
        utc(2026, 1, 1, 12, 0, 40),
        utc(2026, 1, 1, 12, 1, 0),
    ]
    assert ticks(Cron("0 9 * * * 30"), start, 1) == [utc(2026, 1, 2, 9, 0, 30)]


def test_a_tick_is_strictly_after_and_the_latest_is_at_or_before() -> None:
    cron = Cron("*/5 * * * *")
    on_a_tick = utc(2026, 1, 1, 12, 5)

    assert cron.next_after(on_a_tick) == utc(2026, 1, 1, 12, 10)
    assert cron.latest_at_or_before(on_a_tick) == on_a_tick
    assert cron.latest_at_or_before(on_a_tick - timedelta(microseconds=1)) == utc(2026, 1, 1, 12, 0)
    assert cron.ticks_back(on_a_tick, after=utc(2026, 1, 1, 11, 50), limit=10) == [
        utc(2026, 1, 1, 11, 55),
        utc(2026, 1, 1, 12, 0),
        utc(2026, 1, 1, 12, 5),
    ]
    assert cron.ticks_back(on_a_tick, after=None, limit=2) == [utc(2026, 1, 1, 12, 0), on_a_tick]


@pytest.mark.parametrize(
    ("expression", "timezone", "message"),
    [
        ("* * * *", "UTC", "has 4 fields: give 5"),
        ("* * * * * * *", "UTC", "has 7 fields"),
        ("61 * * * *", "UTC", "is not valid"),
        ("0 0 30 2 *", "UTC", "is not valid"),
        ("every minute", "UTC", "has 2 fields"),
        ("* * * * *", "Mars/Olympus_Mons", "unknown time zone 'Mars/Olympus_Mons'"),
        ("* * * * *", "", "unknown time zone ''"),
    ],
)
def test_bad_expressions_and_zones_are_refused_with_the_reason(expression: str, timezone: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        Cron(expression, timezone)


def test_expressions_are_read_in_their_time_zone_through_the_seasons() -> None:
    cron = Cron("0 9 * * *", "Europe/Paris")

    assert cron.next_after(utc(2026, 1, 10)) == utc(2026, 1, 10, 8, 0), "09:00 CET"
    assert cron.next_after(utc(2026, 7, 10)) == utc(2026, 7, 10, 7, 0), "09:00 CEST"


# -- daylight saving time ----------------------------------------------------------------------


def test_when_the_clock_jumps_over_a_daily_tick_it_fires_at_the_jump_once() -> None:
    cron = Cron("30 2 * * *", "Europe/Paris")

    assert ticks(cron, paris(2026, 3, 27, 12, 0), 3) == [
        paris(2026, 3, 28, 2, 30),
        SPRING_FORWARD,  # 02:30 never happened on the 29th: 03:00 CEST, the moment of the jump
        paris(2026, 3, 30, 2, 30),
    ]


def test_when_the_clock_goes_back_a_daily_tick_in_the_repeated_hour_fires_once() -> None:
    cron = Cron("30 2 * * *", "Europe/Paris")

    assert ticks(cron, paris(2026, 10, 24, 12, 0), 2) == [paris(2026, 10, 25, 2, 30), paris(2026, 10, 26, 2, 30)]
    assert cron.latest_at_or_before(paris(2026, 10, 25, 2, 45, fold=1)) == paris(2026, 10, 25, 2, 30)


def test_schedules_that_fire_every_hour_keep_to_real_time_across_both_changes() -> None:
    hourly = Cron("0 * * * *", "Europe/Paris")
    half_hourly = Cron("*/30 * * * *", "Europe/Paris")

    spring = ticks(hourly, SPRING_FORWARD - timedelta(hours=2, minutes=30), 4)
    fall = ticks(half_hourly, FALL_BACK - timedelta(hours=1, minutes=15), 6)

    assert spring == [SPRING_FORWARD + timedelta(hours=hours) for hours in (-2, -1, 0, 1)], "02:00 CET never came"
    assert fall == [FALL_BACK + timedelta(minutes=minutes) for minutes in (-60, -30, 0, 30, 60, 90)]
    assert [tick.astimezone(PARIS).strftime("%H:%M%z") for tick in fall] == [
        "02:00+0200",
        "02:30+0200",
        "02:00+0100",  # the same wall times again, an hour later in real time
        "02:30+0100",
        "03:00+0100",
        "03:30+0100",
    ]


def test_a_schedule_limited_to_the_repeated_hour_fires_in_its_first_pass_only() -> None:
    cron = Cron("*/20 2 * * *", "Europe/Paris")

    assert ticks(cron, FALL_BACK - timedelta(hours=2), 4) == [
        paris(2026, 10, 25, 2, 0),
        paris(2026, 10, 25, 2, 20),
        paris(2026, 10, 25, 2, 40),
        paris(2026, 10, 26, 2, 0),
    ]


def test_a_worker_looking_every_minute_through_both_changes_enqueues_each_tick_once() -> None:
    """A fake clock drives the same steps a worker's scheduler takes: look, enqueue what is due, remember."""
    for night in (SPRING_FORWARD, FALL_BACK):
        for expression in ("30 2 * * *", "0 * * * *", "*/20 * * * *", "0,30 1-3 * * *"):
            for missed in get_args(Missed):
                periodic = schedule(expression, "Europe/Paris", missed=missed)
                # Looks seven seconds past each minute, as a worker's do: a little after each tick.
                start = night - timedelta(hours=4, seconds=-7)
                enqueued = list(_look_every(periodic, start, night + timedelta(hours=4, minutes=1)))
                expected = _expected_ticks(expression, night - timedelta(hours=4), night + timedelta(hours=4))
                assert enqueued == expected, (night, expression, missed)
                assert len(set(enqueued)) == len(enqueued), "no tick twice"


def _look_every(
    periodic: Schedule, start: datetime, end: datetime, step: timedelta = timedelta(minutes=1)
) -> Iterator[datetime]:
    handled = periodic.cron.latest_at_or_before(start)
    now = start
    while now <= end:
        due = periodic.due(now=now, last=handled)
        yield from due
        handled = periodic.cron.latest_at_or_before(now)
        now += step


def _expected_ticks(expression: str, start: datetime, end: datetime) -> list[datetime]:
    """The same ticks found the slow way: every minute of real time, read on the Paris wall clock."""
    every_hour = expression.split()[1] == "*"
    minutes = [start + timedelta(minutes=n) for n in range(int((end - start).total_seconds() // 60) + 1)]
    walls = [minute.astimezone(PARIS).replace(tzinfo=None) for minute in minutes]
    if every_hour:
        return [
            minute
            for minute, wall in zip(minutes, walls, strict=True)
            if minute > start and croniter.match(expression, wall)
        ]
    found = []
    wall = min(walls)
    while wall <= max(walls):
        if croniter.match(expression, wall):
            # Fires at the first moment the wall clock shows this time, or a later one (after a jump).
            first = next((minute for minute, seen in zip(minutes, walls, strict=True) if seen >= wall), None)
            if first is not None and first > start and first not in found:
                found.append(first)
        wall += timedelta(minutes=1)
    return sorted(found)


@settings(max_examples=300, deadline=None)
@given(
    # hypothesis takes naive bounds and attaches the zone itself.
    moment=st.datetimes(min_value=datetime(2026, 1, 1), max_value=datetime(2027, 1, 1), timezones=st.just(UTC)),  # noqa: DTZ001
    expression=st.sampled_from(
        ["0 * * * *", "*/7 * * * *", "30 2 * * *", "15 1-3 * * *", "0 0 * * 0", "* * * * * */13"]
    ),
    timezone=st.sampled_from(["Europe/Paris", "America/New_York", "Australia/Lord_Howe", "UTC", "Asia/Kolkata"]),
)
def test_the_next_tick_and_the_latest_tick_agree_everywhere(moment: datetime, expression: str, timezone: str) -> None:
    cron = Cron(expression, timezone)

    following = cron.next_after(moment)
    latest = cron.latest_at_or_before(moment)

    assert following > moment
    assert cron.latest_at_or_before(following) == following
    assert cron.latest_at_or_before(following - timedelta(microseconds=1)) == latest, "no tick in between"
    assert latest is not None
    assert cron.next_after(latest) == following


# -- which ticks are due -----------------------------------------------------------------------


def test_skip_enqueues_only_the_latest_of_the_missed_ticks() -> None:
    every_five = schedule("*/5 * * * *")

    due = every_five.due(now=utc(2026, 1, 1, 13, 2), last=utc(2026, 1, 1, 12, 0))

    assert due == [utc(2026, 1, 1, 13, 0)]


def test_skip_drops_a_tick_older_than_the_grace() -> None:
    daily = schedule("0 9 * * *", grace=timedelta(minutes=10))

    assert daily.due(now=utc(2026, 1, 1, 9, 10), last=None) == [utc(2026, 1, 1, 9, 0)]
    assert daily.due(now=utc(2026, 1, 1, 9, 10, 1), last=None) == [], "ten minutes and a second late"


def test_catch_up_enqueues_every_missed_tick_oldest_first() -> None:
    every_five = schedule("*/5 * * * *", missed="catch_up")

    due = every_five.due(now=utc(2026, 1, 1, 13, 2), last=utc(2026, 1, 1, 12, 0))

    assert due == [utc(2026, 1, 1, 12, 5) + timedelta(minutes=5 * n) for n in range(12)]


def test_catch_up_is_bounded_to_the_latest_ticks() -> None:
    every_five = schedule("*/5 * * * *", missed="catch_up", catch_up_limit=3)

    due = every_five.due(now=utc(2026, 1, 1, 13, 2), last=utc(2026, 1, 1, 12, 0))

    assert due == [utc(2026, 1, 1, 12, 50), utc(2026, 1, 1, 12, 55), utc(2026, 1, 1, 13, 0)]


def test_with_nothing_known_catch_up_has_nothing_to_catch_up_and_acts_as_skip() -> None:
    every_five = schedule("*/5 * * * *", missed="catch_up")

    assert every_five.due(now=utc(2026, 1, 1, 13, 2), last=None) == [utc(2026, 1, 1, 13, 0)]


@pytest.mark.parametrize("missed", ["skip", "catch_up"])
def test_nothing_is_due_until_the_next_tick(missed: Missed) -> None:
    every_five = schedule("*/5 * * * *", missed=missed)

    assert every_five.due(now=utc(2026, 1, 1, 13, 4, 59), last=utc(2026, 1, 1, 13, 0)) == []
    assert every_five.due(now=utc(2026, 1, 1, 13, 5), last=utc(2026, 1, 1, 13, 0)) == [utc(2026, 1, 1, 13, 5)]


@pytest.mark.parametrize("missed", ["skip", "catch_up"])
def test_no_tick_at_or_before_not_before_is_ever_due(missed: Missed) -> None:
    every_five = schedule("*/5 * * * *", missed=missed)
    cutoff = utc(2026, 1, 1, 12, 50)

    due = every_five.due(now=utc(2026, 1, 1, 13, 2), last=utc(2026, 1, 1, 12, 0), not_before=cutoff)
    stale = every_five.due(now=utc(2026, 1, 1, 13, 2), last=None, not_before=utc(2026, 1, 1, 13, 0))

    assert all(tick > cutoff for tick in due)
    assert due[-1] == utc(2026, 1, 1, 13, 0)
    assert stale == []


def test_each_tick_has_its_own_key_that_sorts_by_time_and_reads_back() -> None:
    every_second = schedule("* * * * * *")
    tick = utc(2026, 3, 29, 1, 0, 5)

    key = every_second.key(tick)

    assert key == "conveyor:schedule:report:2026-03-29T01:00:05Z"
    assert every_second.key(tick.astimezone(PARIS)) == key, "the same instant, whatever its zone"
    assert every_second.tick_of(key) == tick
    assert every_second.tick_of("conveyor:schedule:report-2:2026-03-29T01:00:05Z") is None
    assert every_second.key(tick) < every_second.key(tick + timedelta(seconds=1))
    assert len(KEY_PREFIX) + MAX_NAME_LENGTH + len(":2026-03-29T01:00:05Z") == 255, "the longest name's keys fit"


# -- registering schedules -------------------------------------------------------------------------


def test_periodic_registers_the_function_as_a_task_and_schedules_it() -> None:
    app = Conveyor(database_url="sqlite:///unused.db")

    @app.periodic("0 * * * *", timezone="Europe/Paris", kwargs={"kind": "hourly"})
    async def report(kind: str) -> str:
        return kind

    assert app.tasks["report"] is report
    scheduled = app.schedules["report"]
    assert (scheduled.task, scheduled.cron.expression, scheduled.cron.timezone) == (
        "report",
        "0 * * * *",
        "Europe/Paris",
    )
    assert (scheduled.queue, scheduled.kwargs, scheduled.missed) == ("default", {"kind": "hourly"}, "skip")


def test_a_registered_task_can_be_scheduled_several_times_under_different_names() -> None:
    app = Conveyor(database_url="sqlite:///unused.db")

    @app.periodic("0 6 * * *", name="backup.morning", missed="catch_up", args=["full"])
    @app.task(queue="maintenance", priority=3)
    def backup(kind: str) -> str:
        return kind

    evening = app.schedule("backup", "0 18 * * *", name="backup.evening", args=["incremental"], queue="urgent")

    assert set(app.schedules) == {"backup.morning", "backup.evening"}
    morning = app.schedules["backup.morning"]
    assert (morning.queue, morning.priority, morning.args, morning.missed) == ("maintenance", 3, ["full"], "catch_up")
    assert (evening.queue, evening.args) == ("urgent", ["incremental"])


def test_a_bad_schedule_is_refused_with_every_problem_at_once() -> None:
    app = Conveyor(database_url="sqlite:///unused.db")

    @app.task
    async def report(day: int) -> int:
        return day

    app.schedule(report, "0 * * * *", args=[1])
    with pytest.raises(TypeError) as caught:
        app.schedule(
            report,
            "0 25 * * *",
            timezone="Nowhere/Special",
            args=["monday"],
            missed="sometimes",  # ty: ignore[invalid-argument-type]
            catch_up_limit=0,
            grace=-1,
        )

    message = str(caught.value)
    for problem in (
        "cannot schedule task 'report'",
        "the name 'report' is taken by another schedule",
        "unknown time zone 'Nowhere/Special'",
        "missed must be 'skip' or 'catch_up', not 'sometimes'",
        "catch_up_limit must be 1 to 1000, not 0",
        "grace must not be negative",
        "day: Input should be a valid integer",
    ):
        assert problem in message
    assert list(app.schedules) == ["report"], "nothing half-registered"


def test_a_task_of_another_app_or_no_task_cannot_be_scheduled() -> None:
    app = Conveyor(database_url="sqlite:///unused.db")
    other = Conveyor(database_url="sqlite:///unused.db")

    @other.task
    async def elsewhere() -> None: ...

    @app.task(name="elsewhere")
    async def here() -> None: ...

    with pytest.raises(TypeError, match="registered on another app"):
        app.schedule(elsewhere, "* * * * *")
    with pytest.raises(UnknownTaskError, match="no-such-task"):
        app.schedule("no-such-task", "* * * * *")
