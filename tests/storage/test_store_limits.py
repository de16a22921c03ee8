"""Claims under limits, against a real database per test (SQLite and PostgreSQL).

Queue limits count the running jobs of every worker; rate limits are spent once however many
stores claim at the same moment; a job held back by a limit is left exactly as it was.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta

import pytest
from tests.storage.test_store import LEASE, T0, ack_for, get, insert, new
from tests.support.waiting import settle

from conveyor.jobs import Job, JobState
from conveyor.limits import ClaimLimits, parse_rate_limit
from conveyor.settings import Settings
from conveyor.storage import Store, open_store

REPORTS_TWO = ClaimLimits(queues={"reports": 2})


@pytest.fixture
async def stores(backend_url: str) -> AsyncIterator[list[Store]]:
    """Four independent stores on one database, as four worker processes would have."""
    opened = [await open_store(Settings(database_url=backend_url)) for _ in range(4)]
    yield opened
    for store in opened:
        await store.close()


async def claim(
    store: Store,
    limits: ClaimLimits,
    *,
    owner: str = "w#1",
    now: datetime = T0,
    limit: int = 100,
    queues: Sequence[str] = ("default",),
) -> list[Job]:
    return await store.fetch_jobs(
        queues=queues, limit=limit, lease_owner=owner, lease_seconds=LEASE, now=now, limits=limits
    )


def rated(text: str, task: str = "rated") -> ClaimLimits:
    return ClaimLimits(rates={task: parse_rate_limit(text)})


# -- queue limits -----------------------------------------------------------------------------


async def test_a_limited_queue_runs_no_more_jobs_than_its_limit_and_leaves_the_rest_untouched(
    stores: list[Store],
) -> None:
    store = stores[0]
    jobs = await insert(store, *(new(queue="reports") for _ in range(5)))

    first = await claim(store, REPORTS_TWO, queues=["reports"])
    second = await claim(store, REPORTS_TWO, queues=["reports"])

    assert [job.id for job in first] == [job.id for job in jobs[:2]], "the first two, in claim order"
    assert second == []
    for job in jobs[2:]:
        waiting = await get(store, job.id)
        assert (waiting.state, waiting.attempt, waiting.lease_owner) == (JobState.QUEUED, 0, None)


async def test_the_limit_counts_jobs_running_under_any_worker(stores: list[Store]) -> None:
    await insert(stores[0], *(new(queue="reports") for _ in range(5)))

    assert len(await claim(stores[0], REPORTS_TWO, queues=["reports"], limit=1, owner="a#1")) == 1
    assert len(await claim(stores[1], REPORTS_TWO, queues=["reports"], owner="b#1")) == 1
    assert await claim(stores[2], REPORTS_TWO, queues=["reports"], owner="c#1") == []


async def test_room_returns_when_a_running_job_of_the_queue_ends(stores: list[Store]) -> None:
    store = stores[0]
    await insert(store, *(new(queue="reports") for _ in range(5)))
    running = await claim(store, REPORTS_TWO, queues=["reports"])
    later = T0 + timedelta(seconds=1)

    await store.ack_jobs([ack_for(running[0], JobState.SUCCEEDED, now=later)], now=later)
    await store.ack_jobs([ack_for(running[1], JobState.RETRYING, now=later, run_at=T0)], now=later)

    again = await claim(store, REPORTS_TWO, queues=["reports"], now=later)
    assert len(again) == 2, "a finished job and a failed attempt both free their place"


async def test_other_queues_keep_flowing_while_a_limited_queue_is_full(stores: list[Store]) -> None:
    store = stores[0]
    await insert(store, *(new(queue="reports", priority=9) for _ in range(5)))
    plain = await insert(store, *(new(queue="default") for _ in range(3)))

    claimed = await claim(store, REPORTS_TWO, queues=["reports", "default"], limit=4)

    assert [job.queue for job in claimed] == ["reports", "reports", "default", "default"]
    assert [job.id for job in claimed[2:]] == [job.id for job in plain[:2]]


async def test_concurrent_claims_from_several_stores_never_exceed_the_limit(stores: list[Store]) -> None:
    await insert(stores[0], *(new(queue="reports") for _ in range(30)))

    results = await asyncio.gather(
        *(
            claim(store, REPORTS_TWO, queues=["reports"], limit=5, owner=f"w{index}#{round_}")
            for index, store in enumerate(stores)
            for round_ in range(5)
        )
    )

    assert sum(len(claimed) for claimed in results) == 2
    (stats,) = await stores[0].queue_stats()
    assert stats.counts == {JobState.RUNNING: 2, JobState.QUEUED: 28}


# -- rate limits ------------------------------------------------------------------------------


async def test_a_rate_limited_task_starts_its_allowance_then_waits_for_the_window(stores: list[Store]) -> None:
    store = stores[0]
    jobs = await insert(store, *(new("rated") for _ in range(5)))
    limits = rated("3/s")

    assert len(await claim(store, limits)) == 3
    assert await claim(store, limits, now=T0 + timedelta(microseconds=999_999)) == []
    for job in jobs[3:]:
        waiting = await get(store, job.id)
        assert (waiting.state, waiting.attempt) == (JobState.QUEUED, 0), "held back, no attempt spent"
    assert len(await claim(store, limits, now=T0 + timedelta(seconds=1))) == 2


async def test_the_window_slides_rather_than_resetting_on_the_clock(stores: list[Store]) -> None:
    store = stores[0]
    await insert(store, *(new("rated") for _ in range(6)))
    limits = rated("2/m")

    assert len(await claim(store, limits, limit=1, now=T0 + timedelta(seconds=50))) == 1
    assert len(await claim(store, limits, limit=1, now=T0 + timedelta(seconds=70))) == 1
    # A fixed minute would have started afresh at T0 + 60 s; the last 60 s already hold two.
    assert await claim(store, limits, now=T0 + timedelta(seconds=100)) == []
    # Starts are kept to 1/100 of the window (0.6 s here), rounded up: allowance comes back
    # that much late at most, never early.
    assert len(await claim(store, limits, now=T0 + timedelta(seconds=110.6))) == 1
    assert len(await claim(store, limits, now=T0 + timedelta(seconds=130.6))) == 1


async def test_a_task_out_of_allowance_does_not_hold_up_the_rest_of_its_queue(stores: list[Store]) -> None:
    store = stores[0]
    await insert(store, *(new("rated", priority=5) for _ in range(5)))
    plain = await insert(store, *(new("plain") for _ in range(4)))
    limits = rated("1/m")

    first = await claim(store, limits, limit=3)
    second = await claim(store, limits, limit=10)

    assert [job.task for job in first] == ["rated", "plain", "plain"], "the batch is filled past the held-back jobs"
    assert [job.id for job in second] == [job.id for job in plain[2:]]


async def test_concurrent_claims_spend_an_allowance_once(stores: list[Store]) -> None:
    await insert(stores[0], *(new("rated") for _ in range(20)))
    limits = rated("5/s")

    results = await asyncio.gather(
        *(
            claim(store, limits, limit=3, owner=f"w{index}#{round_}")
            for index, store in enumerate(stores)
            for round_ in range(4)
        )
    )

    assert sum(len(claimed) for claimed in results) == 5


async def test_rate_limits_are_per_task_across_queues(stores: list[Store]) -> None:
    store = stores[0]
    await insert(store, *(new("rated", queue=queue) for queue in ("default", "other") for _ in range(3)))
    limits = rated("4/h")

    first = await claim(store, limits, queues=["default"])
    second = await claim(store, limits, queues=["other"])

    assert (len(first), len(second)) == (3, 1)


async def test_queue_and_rate_limits_hold_together(stores: list[Store]) -> None:
    store = stores[0]
    await insert(store, *(new("rated", queue="reports", priority=1) for _ in range(3)))
    await insert(store, *(new("plain", queue="reports") for _ in range(3)))
    limits = ClaimLimits(queues={"reports": 3}, rates={"rated": parse_rate_limit("1/s")})

    claimed = await claim(store, limits, queues=["reports"])

    assert [job.task for job in claimed] == ["rated", "plain", "plain"]


# -- waking a held-up worker ----------------------------------------------------------------------


async def test_a_store_held_up_by_a_full_queue_wakes_when_one_of_its_jobs_finishes(stores: list[Store]) -> None:
    store = stores[0]
    await insert(store, *(new(queue="reports") for _ in range(3)))
    running = await claim(store, REPORTS_TWO, queues=["reports"])
    assert await claim(store, REPORTS_TWO, queues=["reports"]) == []
    await settle(store)

    await store.ack_jobs([ack_for(running[0], JobState.SUCCEEDED, now=T0)], now=T0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await store.wait_for_jobs(30)

    assert loop.time() - started < 5, "woken by the finish, not by the timeout"
    assert len(await claim(store, REPORTS_TWO, queues=["reports"])) == 1


async def test_a_store_held_up_by_a_rate_limit_wakes_when_allowance_returns_and_not_before(
    stores: list[Store],
) -> None:
    store = stores[0]
    await insert(store, *(new("rated") for _ in range(4)), now=datetime.now(UTC))
    limits = rated("2/s")
    assert len(await claim(store, limits, now=datetime.now(UTC))) == 2
    loop = asyncio.get_running_loop()
    started = loop.time()
    wakes = 0

    while not await claim(store, limits, now=datetime.now(UTC)):
        await store.wait_for_jobs(30)
        wakes += 1

    assert 0.9 < loop.time() - started < 5
    assert wakes <= 3, "a held-up worker sleeps until its allowance returns; it does not spin"
