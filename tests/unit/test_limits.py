"""Limits as data: the rate-limit parser, the sliding window's arithmetic, queue-limit settings,
and the waker that lets a held-up worker sleep until a claim can get further."""

from __future__ import annotations

import asyncio
import bisect
import random
from datetime import UTC, datetime, timedelta

import pytest

from conveyor import Conveyor
from conveyor.errors import ConfigError
from conveyor.limits import ClaimLimits, RateLimit, StartWindow, parse_rate_limit
from conveyor.settings import load_settings
from conveyor.storage.limits import LimitedClaim, Waker, queue_lock_key

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


# -- parsing ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "count", "seconds"),
    [("10/s", 10, 1), ("100/m", 100, 60), ("1000/h", 1000, 3600), ("1/s", 1, 1), ("999999999/h", 999_999_999, 3600)],
)
def test_rate_limits_are_a_count_per_second_minute_or_hour(text: str, count: int, seconds: int) -> None:
    assert parse_rate_limit(text) == RateLimit(count=count, per_seconds=seconds, text=text)


@pytest.mark.parametrize(
    "text",
    ["", "10", "10/", "/s", "0/s", "-1/s", "1.5/s", "05/s", "10/d", "10/min", "10 /s", " 10/s", "10/S", "1000000000/s"],
)
def test_anything_else_is_refused_with_the_forms_that_are_accepted(text: str) -> None:
    with pytest.raises(ValueError, match=r"'N/s', 'N/m' or 'N/h'.*e\.g\. '10/s', '100/m', '1000/h'") as caught:
        parse_rate_limit(text)
    assert repr(text) in str(caught.value)


def test_a_task_with_a_bad_rate_limit_is_not_registered(app: Conveyor) -> None:
    with pytest.raises(TypeError, match=r"cannot register task 'fetch': rate_limit '100/min' is not understood"):

        @app.task(rate_limit="100/min")
        async def fetch() -> None: ...

    assert "fetch" not in app.tasks


def test_a_task_keeps_its_parsed_rate_limit(app: Conveyor) -> None:
    @app.task(rate_limit="5/s")
    async def fetch() -> None: ...

    assert fetch.options.rate_limit == RateLimit(count=5, per_seconds=1, text="5/s")


# -- queue limit settings ---------------------------------------------------------------------------


def test_queue_limits_come_from_the_environment_as_name_equals_n(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_QUEUE_LIMITS", "reports=2, exports = 1")

    assert load_settings().queue_limits == {"reports": 2, "exports": 1}
    assert load_settings(queue_limits={"reports": 5}).queue_limits == {"reports": 5}, "code wins over the environment"
    assert load_settings().queue_limits == {"reports": 2, "exports": 1}


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("reports", "'reports' is not name=N"),
        ("reports=two", "'reports=two' is not name=N"),
        ("=2", "'=2' is not name=N"),
        ("reports=0", "the limit of queue 'reports' must be at least 1, not 0"),
        ({"": 1}, "queue names must be 1 to 255 characters"),
    ],
)
def test_bad_queue_limits_are_refused(value: object, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(queue_limits=value)
    (line,) = caught.value.problems
    assert line.startswith("queue_limits (CONVEYOR_QUEUE_LIMITS): ")
    assert problem in line


def test_a_worker_respects_the_limits_of_its_own_queues_and_every_rate_limit() -> None:
    rate = parse_rate_limit("1/s")
    limits = ClaimLimits(queues={"reports": 2, "exports": 1}, rates={"fetch": rate})

    assert limits.for_queues(["default"]) == ClaimLimits(queues={}, rates={"fetch": rate})
    assert limits.for_queues(["reports"]) == ClaimLimits(queues={"reports": 2}, rates={"fetch": rate})
    assert ClaimLimits(queues={"reports": 2}).for_queues(["default"]) is None, "nothing to respect: the plain claim"
    assert limits.describe() == {"queue_limits": {"exports": 1, "reports": 2}, "rate_limits": {"fetch": "1/s"}}


def test_queue_lock_keys_are_stable_signed_64_bit_numbers() -> None:
    key = queue_lock_key("reports")

    assert key == queue_lock_key("reports")
    assert key != queue_lock_key("exports")
    assert -(2**63) <= key < 2**63


# -- the sliding window -----------------------------------------------------------------------------


def window(text: str, stored: list[list[int]], now: datetime) -> StartWindow:
    return StartWindow(parse_rate_limit(text), stored, now)


def test_a_window_has_room_for_the_whole_allowance_until_it_is_spent() -> None:
    fresh = window("3/s", [], T0)
    assert fresh.room == 3
    assert fresh.room_returns_at() is None

    fresh.spend(3)

    assert fresh.room == 0
    assert fresh.room_returns_at() == T0 + timedelta(seconds=1)


def test_room_returns_as_each_start_leaves_the_window() -> None:
    rate = "3/s"
    slots = window(rate, [], T0)
    slots.spend(2)
    later = window(rate, slots.slots, T0 + timedelta(milliseconds=500))
    later.spend(1)

    assert later.room_returns_at() == T0 + timedelta(seconds=1), "the two first starts leave first"
    assert window(rate, later.slots, T0 + timedelta(milliseconds=999)).room == 0
    assert window(rate, later.slots, T0 + timedelta(seconds=1)).room == 2
    assert window(rate, later.slots, T0 + timedelta(seconds=1.5)).room == 3


def test_old_starts_are_dropped_from_the_row() -> None:
    slots = window("3/s", [], T0)
    slots.spend(3)

    assert window("3/s", slots.slots, T0 + timedelta(seconds=1.5)).slots == slots.slots, "kept a while for late clocks"
    assert window("3/s", slots.slots, T0 + timedelta(seconds=2)).slots == []


def test_the_row_stays_small_however_many_claims_spend_it() -> None:
    slots: list[list[int]] = []
    for step in range(10_000):
        claim = window("1000000/m", slots, T0 + timedelta(milliseconds=step * 7))
        claim.spend(1)
        slots = claim.slots

    assert len(slots) <= 201, "at most a slot per 1/100 of the window, for two windows"


def test_no_span_of_one_window_ever_holds_more_starts_than_the_limit() -> None:
    """Random claims, as a fleet would make them: count every span, starting at every start."""
    rng = random.Random(7)
    for text in ("5/s", "7/m", "100/h"):
        rate = parse_rate_limit(text)
        span = timedelta(seconds=rate.per_seconds)
        slots: list[list[int]] = []
        starts: list[datetime] = []
        now = T0
        for _ in range(2_000):
            now += timedelta(microseconds=rng.randrange(0, rate.per_seconds * 400_000))
            claim = StartWindow(rate, slots, now)
            taken = min(claim.room, rng.randrange(0, rate.count + 3))
            claim.spend(taken)
            slots = claim.slots
            starts += [now] * taken
        assert len(starts) > rate.count * 50, "the limit was reached again and again"
        # Starts are in time order: the span from each start ends where bisect finds its end.
        for index, first in enumerate(starts):
            inside = bisect.bisect_left(starts, first + span) - index
            assert inside <= rate.count, f"{text}: {inside} starts in the span from {first}"


# -- waking a held-up worker ---------------------------------------------------------------------------


async def test_the_waker_wakes_once_a_job_it_waits_on_finishes_and_not_for_others() -> None:
    woken = asyncio.Event()
    waker = Waker(woken.set)
    waker.held_up(LimitedClaim(waiting_on={"a", "b"}), T0)

    waker.finished({"c"})
    assert not woken.is_set()
    waker.finished({"x", "b"})
    assert woken.is_set()


async def test_the_waker_wakes_when_the_earliest_allowance_returns() -> None:
    woken = asyncio.Event()
    waker = Waker(woken.set)
    loop = asyncio.get_running_loop()
    started = loop.time()

    waker.held_up(LimitedClaim(room_returns_at=T0 + timedelta(seconds=5)), T0)
    waker.held_up(LimitedClaim(room_returns_at=T0 + timedelta(seconds=0.2)), T0)
    waker.held_up(LimitedClaim(room_returns_at=T0 + timedelta(seconds=3)), T0)
    await asyncio.wait_for(woken.wait(), 2)

    assert 0.15 < loop.time() - started < 2
