"""The Store contract, proven against a real database per test.

Every test takes the ``store`` fixture, so another backend (PostgreSQL) joins the whole suite by
adding one parameter there. Time is injected as ``now``: nothing here sleeps.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import event
from tests.support.waiting import settle

from conveyor.errors import JobNotFoundError, JobStateError, StorageError
from conveyor.jobs import (
    Ack,
    AttemptRecord,
    Job,
    JobError,
    JobFilter,
    JobState,
    NewJob,
    Outcome,
    new_job_id,
)
from conveyor.settings import Settings
from conveyor.storage import Store, open_store, sql
from conveyor.storage.sql import SqlStore

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
LEASE = 30.0


@pytest.fixture
async def store(backend_url: str) -> AsyncIterator[Store]:
    opened = await open_store(Settings(database_url=backend_url))
    yield opened
    await opened.close()


@pytest.fixture
async def twin_store(store: Store, backend_url: str) -> AsyncIterator[Store]:
    """A second, independent store on the same database as ``store`` (as another process would have)."""
    opened = await open_store(Settings(database_url=backend_url))
    yield opened
    await opened.close()


# -- helpers ------------------------------------------------------------------------------


def new(task: str = "task", **fields: Any) -> NewJob:
    fields.setdefault("args", [])
    fields.setdefault("kwargs", {})
    return NewJob(task=task, **fields)


async def insert(store: Store, *jobs: NewJob, now: datetime = T0) -> list[Job]:
    return await store.insert_jobs(list(jobs), now=now)


async def claim(
    store: Store,
    *,
    owner: str = "w#1",
    now: datetime = T0,
    limit: int = 100,
    queues: Sequence[str] = ("default",),
    lease_seconds: float = LEASE,
) -> list[Job]:
    return await store.fetch_jobs(queues=queues, limit=limit, lease_owner=owner, lease_seconds=lease_seconds, now=now)


async def claim_one(store: Store, *, owner: str = "w#1", now: datetime = T0) -> Job:
    (job,) = await claim(store, owner=owner, now=now, limit=1)
    return job


async def claim_one_from(store: Store, queue: str) -> Job:
    (job,) = await claim(store, queues=[queue], limit=1)
    return job


def ack_for(
    job: Job,
    state: JobState,
    *,
    now: datetime,
    outcome: Outcome | None = None,
    owner: str | None = None,
    result: Any = None,
    error: JobError | None = None,
    run_at: datetime | None = None,
    attempt_delta: int = 0,
) -> Ack:
    if outcome is None:
        outcome = Outcome.SUCCEEDED if state is JobState.SUCCEEDED else Outcome.FAILED
    return Ack(
        job_id=job.id,
        lease_owner=owner if owner is not None else job.lease_owner or "",
        state=state,
        record=AttemptRecord(
            attempt=job.attempt,
            worker=job.lease_owner,
            started_at=job.attempted_at,
            ended_at=now,
            outcome=outcome,
            error=error,
        ),
        result=result,
        error=error,
        run_at=run_at,
        attempt_delta=attempt_delta,
    )


async def get(store: Store, job_id: str) -> Job:
    job = await store.get_job(job_id)
    assert job is not None, f"job {job_id} is gone"
    return job


async def all_jobs(store: Store) -> list[Job]:
    return (await store.list_jobs(JobFilter(), limit=1_000)).jobs


BOOM = JobError(type="RuntimeError", message="boom", traceback="Traceback ...")


# -- inserting ------------------------------------------------------------------------------


async def test_insert_stores_a_job_due_now_as_queued(store: Store) -> None:
    (job,) = await insert(store, new("send", args=[1, "a"], kwargs={"b": True}, queue="emails", priority=3))

    assert job.state is JobState.QUEUED
    assert (job.task, job.args, job.kwargs, job.queue, job.priority) == ("send", [1, "a"], {"b": True}, "emails", 3)
    assert (job.attempt, job.run_at, job.created_at, job.updated_at) == (0, T0, T0, T0)
    assert job.history == ()
    assert job.finished_at is None
    assert job.lease_owner is None
    assert await store.get_job(job.id) == job


async def test_insert_stores_a_job_due_later_as_scheduled(store: Store) -> None:
    (later,) = await insert(store, new(run_at=T0 + timedelta(minutes=5)))
    (past,) = await insert(store, new(run_at=T0 - timedelta(minutes=5)))

    assert (await get(store, later.id)).state is JobState.SCHEDULED
    assert (await get(store, later.id)).run_at == T0 + timedelta(minutes=5)
    assert (await get(store, past.id)).state is JobState.QUEUED


async def test_insert_many_stores_every_job_and_returns_them_in_order(store: Store) -> None:
    batch = [new(args=[n], run_at=T0 + timedelta(seconds=n * 30)) for n in range(4)]

    inserted = await insert(store, *batch)

    assert [job.id for job in inserted] == [item.id for item in batch]
    assert [job.args for job in inserted] == [[0], [1], [2], [3]]
    assert [job.state for job in inserted] == [JobState.QUEUED] + [JobState.SCHEDULED] * 3
    assert sorted(job.id for job in await all_jobs(store)) == sorted(item.id for item in batch)


async def test_a_big_batch_is_stored_whole_and_storing_it_again_adds_nothing(store: Store) -> None:
    # Big enough for PostgreSQL's COPY path; the second insert is a retry whose first commit landed.
    awkward = {"big": 2**70, "text": 'naïve ☃ "quoted"', "none": None}
    batch = [new(args=[n], kwargs=awkward, run_at=T0 + timedelta(seconds=n % 2)) for n in range(300)]

    first = await insert(store, *batch)
    again = await insert(store, *batch)

    stored = {job.id: job for job in await all_jobs(store)}
    assert len(stored) == 300
    assert [job.id for job in first] == [job.id for job in again] == [item.id for item in batch]
    assert first == [stored[item.id] for item in batch], "the returned jobs read as the stored ones"
    assert [stored[item.id].args for item in batch] == [[n] for n in range(300)]
    assert all(job.kwargs == awkward for job in stored.values())
    assert sum(job.state is JobState.SCHEDULED for job in stored.values()) == 150
    assert len(await claim(store, limit=500)) == 150


async def test_a_big_batch_in_parts_of_any_size_stores_each_job_once(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A part is built in slices; a part size that is no multiple of the slice must still end
    # where the next part begins (PostgreSQL inserts in parts; SQLite in one statement).
    monkeypatch.setattr(sql, "_INSERT_PART", 70)
    batch = [new(args=[n]) for n in range(300)]

    inserted = await insert(store, *batch)

    assert [job.id for job in inserted] == [item.id for item in batch]
    assert sorted(job.args[0] for job in await all_jobs(store)) == list(range(300))


async def test_a_big_batch_wakes_a_store_waiting_in_another_process(store: Store, twin_store: Store) -> None:
    await settle(twin_store)
    waiting = asyncio.create_task(twin_store.wait_for_jobs(30))
    loop = asyncio.get_running_loop()
    started = loop.time()

    await insert(store, *(new(args=[n]) for n in range(300)))
    await waiting

    assert loop.time() - started < 5, "woken by the batch (NOTIFY, or the SQLite commit), not by the timeout"


async def test_a_big_batch_stores_every_column_whether_its_jobs_share_the_value_or_not(store: Store) -> None:
    # PostgreSQL sends a value the whole batch shares once and the others as arrays: each column
    # here is shared in one batch, varies in another, and is sometimes NULL.
    def job(n: int, varied: bool) -> NewJob:
        return new(
            f"task-{n % 3}" if varied else "task",
            args=[n] if varied else [],
            kwargs={"n": n} if varied else {"same": True},
            queue=f"q{n % 2}" if varied else "shared",
            priority=n % 4 if varied else 2,
            max_attempts=1 + n % 5 if varied else 7,
            run_at=T0 + timedelta(seconds=n % 2) if varied else T0 - timedelta(seconds=5),
            timeout_seconds=(None if n % 2 else 1.5 + n) if varied else 9.0,
            trace_context={"traceparent": f"00-{n:032x}-{n:016x}-01"} if varied and n % 3 else None,
            correlation_id=(f"req-{n}" if n % 2 else None) if varied else "req-shared",
            parent_id=(new_job_id() if n % 4 == 0 else None) if varied else None,
        )

    batches = [[job(n, varied) for n in range(250)] for varied in (True, False)]

    returned = [await insert(store, *batch) for batch in batches]

    stored = {job.id: job for job in (await store.list_jobs(JobFilter(), limit=1_000)).jobs}
    for batch, jobs in zip(batches, returned, strict=True):
        assert jobs == [stored[item.id] for item in batch], "the returned jobs read as the stored ones"
        for item, got in zip(batch, jobs, strict=True):
            expected = (item.task, item.args, item.kwargs, item.queue, item.priority, item.max_attempts)
            assert (got.task, got.args, got.kwargs, got.queue, got.priority, got.max_attempts) == expected
            assert (got.run_at, got.timeout_seconds, got.trace_context) == (
                item.run_at,
                item.timeout_seconds,
                item.trace_context,
            )
            assert (got.correlation_id, got.parent_id, got.created_at) == (item.correlation_id, item.parent_id, T0)


async def test_a_job_inserted_alone_stores_every_column(store: Store) -> None:
    # PostgreSQL sends a lone job as a row of parameters, not as a JSON document.
    alone = new(
        "task-alone",
        args=[1, "two", None, 2**70],
        kwargs={"k": {"nested": True}},
        queue="solo",
        priority=3,
        max_attempts=4,
        run_at=T0 - timedelta(seconds=1),
        timeout_seconds=2.5,
        trace_context={"traceparent": f"00-{1:032x}-{1:016x}-01"},
        correlation_id="req-alone",
        parent_id=new_job_id(),
    )
    bare = new(kwargs={})

    returned = [(await insert(store, item))[0] for item in (alone, bare)]

    for item, job in zip((alone, bare), returned, strict=True):
        assert job == await get(store, item.id), "the returned job reads as the stored one"
        expected = (item.task, item.args, item.kwargs, item.queue, item.priority, item.max_attempts, item.run_at or T0)
        assert (job.task, job.args, job.kwargs, job.queue, job.priority, job.max_attempts, job.run_at) == expected
        assert (job.timeout_seconds, job.trace_context, job.correlation_id, job.parent_id) == (
            item.timeout_seconds,
            item.trace_context,
            item.correlation_id,
            item.parent_id,
        )
        assert (job.state, job.attempt, job.history, job.created_at) == (JobState.QUEUED, 0, (), T0)


async def test_one_bad_job_late_in_a_big_batch_stores_none_of_it(store: Store) -> None:
    # Big enough for PostgreSQL to insert it in parts: the parts before the bad job's are rolled back too.
    batch = [new(args=[n], max_attempts=0 if n == 450 else 5) for n in range(500)]

    with pytest.raises(StorageError):
        await insert(store, *batch)

    assert await all_jobs(store) == []
    assert len(await insert(store, *[new(args=[n]) for n in range(500)])) == 500


async def test_awkward_json_survives_insert_and_claim_exactly(store: Store) -> None:
    awkward = [2**70, -(2**63), 1.5, 'naïve ☃ "quoted"', None, {"nested": [None, True, {"k": "v"}]}, []]
    (job,) = await insert(store, new(args=awkward, kwargs={"null": None, "big": 2**64}))

    (claimed,) = await store.fetch_jobs(queues=["default"], limit=1, lease_owner="w#1", lease_seconds=30, now=T0)

    assert claimed.id == job.id
    assert claimed.args == awkward
    assert claimed.kwargs == {"null": None, "big": 2**64}
    assert claimed.trace_context is None


async def test_insert_many_is_one_transaction_so_one_bad_job_stores_none(store: Store) -> None:
    # max_attempts=0 breaks a CHECK constraint: the valid jobs in the same batch must not land either.
    with pytest.raises(StorageError):
        await insert(store, new(args=[1]), new(args=[2]), new(args=[3], max_attempts=0))

    assert await all_jobs(store) == []


async def test_a_big_batch_with_one_bad_job_stores_none(store: Store) -> None:
    # Big enough for PostgreSQL's COPY path, where the returned jobs are built while it runs.
    batch = [new(args=[n]) for n in range(199)] + [new(args=["bad"], max_attempts=0)]

    with pytest.raises(StorageError):
        await insert(store, *batch)

    assert await all_jobs(store) == []
    (after,) = await insert(store, new(args=["after"]))
    assert [job.id for job in await all_jobs(store)] == [after.id]


async def test_idempotency_key_returns_the_existing_job_and_stores_only_one(store: Store) -> None:
    (first,) = await insert(store, new(args=["first"], idempotency_key="order-7"))
    (again,) = await insert(store, new(args=["second"], idempotency_key="order-7"), now=T0 + timedelta(hours=1))

    assert again == first
    assert again.args == ["first"]
    assert [job.id for job in await all_jobs(store)] == [first.id]


async def test_idempotency_key_repeated_within_one_batch_stores_one_job(store: Store) -> None:
    one, two, plain = await insert(
        store, new(args=[1], idempotency_key="k"), new(args=[2], idempotency_key="k"), new(args=[3])
    )

    assert one.id == two.id
    assert one.args == two.args == [1]
    assert plain.args == [3]
    assert len(await all_jobs(store)) == 2


# -- claiming ------------------------------------------------------------------------------


async def test_a_claimed_job_reads_exactly_as_the_stored_one(store: Store) -> None:
    # The claim does not read back what it sets itself (state, lease, times): the job it returns
    # must still equal the row as stored, also for a retry that carries an error and a history.
    (retried,) = await insert(store, new(args=[1], correlation_id="req-1", trace_context={"traceparent": "00-ab"}))
    first = await claim_one(store)
    await store.ack_jobs([ack_for(first, JobState.RETRYING, now=T0, error=BOOM, run_at=T0)], now=T0)
    await insert(store, new(args=[2], kwargs={"k": [True]}, priority=3))
    away = timezone(timedelta(hours=-5))

    claimed = await claim(store, now=(T0 + timedelta(seconds=1)).astimezone(away))

    assert {job.id for job in claimed} >= {retried.id}
    assert [await get(store, job.id) for job in claimed] == claimed
    # Equal instants compare equal in any zone: that they read in UTC, as stored times do, is checked apart.
    times = [time for job in claimed for time in (job.attempted_at, job.lease_expires_at, job.updated_at)]
    assert all(time is not None and time.utcoffset() == timedelta(0) for time in times)


async def test_fetch_claims_higher_priority_first_then_earlier_run_at_then_lower_id(store: Store) -> None:
    older_id, newer_id = new_job_id(), new_job_id()
    await insert(
        store,
        new(args=["late-low"], run_at=T0 - timedelta(seconds=10), id=newer_id),
        new(args=["high"], priority=5, run_at=T0),
        new(args=["early-low"], run_at=T0 - timedelta(seconds=20)),
        new(args=["late-low-older-id"], run_at=T0 - timedelta(seconds=10), id=older_id),
    )
    expected = [["high"], ["early-low"], ["late-low-older-id"], ["late-low"]]

    # One at a time, so the order is the database's claim order, not a sort of the batch.
    one_by_one = [(await claim_one(store)).args for _ in range(4)]

    assert one_by_one == expected


async def test_fetch_returns_a_batch_in_claim_order(store: Store) -> None:
    await insert(store, *(new(args=[p], priority=p) for p in (1, 9, 4, 0, 7)))

    claimed = await claim(store)

    assert [job.args for job in claimed] == [[9], [7], [4], [1], [0]]


async def test_fetch_claims_no_more_than_the_limit(store: Store) -> None:
    await insert(store, *(new(args=[n]) for n in range(5)))

    claimed = await claim(store, limit=2)

    assert len(claimed) == 2
    states = sorted(job.state for job in await all_jobs(store))
    assert states == sorted([JobState.RUNNING] * 2 + [JobState.QUEUED] * 3)
    assert await claim(store, limit=0) == []


async def test_fetch_claims_only_from_the_queues_asked_for(store: Store) -> None:
    await insert(store, new(queue="default"), new(queue="emails"), new(queue="reports"))

    claimed = await claim(store, queues=["emails", "reports"])

    assert sorted(job.queue for job in claimed) == ["emails", "reports"]
    (left,) = [job for job in await all_jobs(store) if job.state is JobState.QUEUED]
    assert left.queue == "default"


async def test_fetch_across_queues_takes_the_best_of_all_of_them_up_to_the_limit(store: Store) -> None:
    await insert(
        store,
        *(new(args=[f"emails-{p}"], queue="emails", priority=p) for p in (1, 8, 3)),
        *(new(args=[f"reports-{p}"], queue="reports", priority=p) for p in (9, 2, 7)),
    )

    first = await claim(store, queues=["emails", "reports"], limit=3)
    rest = await claim(store, queues=["reports", "emails"], limit=10)

    assert [job.args for job in first] == [["reports-9"], ["emails-8"], ["reports-7"]]
    assert [job.args for job in rest] == [["emails-3"], ["reports-2"], ["emails-1"]]


async def test_fetch_skips_jobs_that_are_not_yet_due(store: Store) -> None:
    (job,) = await insert(store, new(run_at=T0 + timedelta(minutes=1)))

    assert await claim(store, now=T0 + timedelta(seconds=59)) == []
    assert [j.id for j in await claim(store, now=T0 + timedelta(minutes=1))] == [job.id]


async def test_fetch_marks_the_job_running_with_its_attempt_and_lease(store: Store) -> None:
    await insert(store, new())
    now = T0 + timedelta(seconds=5)

    job = await claim_one(store, owner="worker-a#1", now=now)

    assert job.state is JobState.RUNNING
    assert job.attempt == 1
    assert job.lease_owner == "worker-a#1"
    assert job.lease_expires_at == now + timedelta(seconds=LEASE)
    assert job.attempted_at == now
    assert job.updated_at == now
    assert await get(store, job.id) == job


async def test_a_claimed_job_is_not_claimed_again(store: Store) -> None:
    await insert(store, new())
    await claim_one(store, owner="w#1")

    assert await claim(store, owner="w#2") == []
    # Not even once its lease has expired: only the rescuer hands a running job back.
    assert await claim(store, owner="w#3", now=T0 + timedelta(hours=1)) == []


# -- acknowledging ------------------------------------------------------------------------------


async def test_ack_succeeded_records_result_history_and_finished_at(store: Store) -> None:
    await insert(store, new())
    job = await claim_one(store, owner="w#1")
    done_at = T0 + timedelta(seconds=3)

    applied = await store.ack_jobs([ack_for(job, JobState.SUCCEEDED, now=done_at, result={"ok": 1})], now=done_at)

    assert applied == {job.id}
    stored = await get(store, job.id)
    assert stored.state is JobState.SUCCEEDED
    assert stored.result == {"ok": 1}
    assert stored.error is None
    assert stored.finished_at == done_at
    assert stored.updated_at == done_at
    assert (stored.lease_owner, stored.lease_expires_at) == (None, None)
    assert stored.attempt == 1
    assert stored.history == (
        AttemptRecord(attempt=1, worker="w#1", started_at=T0, ended_at=done_at, outcome=Outcome.SUCCEEDED),
    )


@pytest.mark.parametrize(
    "result",
    [
        [2**70, -(2**63), 1.5, 'naïve ☃ "quoted"', None, {"nested": [None, True, {"k": "v"}]}, []],
        "a plain string",
        "2026-03-01T12:00:00+00:00",
        0,
        False,
    ],
)
async def test_a_result_is_stored_exactly_as_the_task_returned_it(store: Store, result: Any) -> None:
    await insert(store, new())
    job = await claim_one(store)

    await store.ack_jobs([ack_for(job, JobState.SUCCEEDED, now=T0, result=result)], now=T0)

    assert (await get(store, job.id)).result == result


async def test_ack_retrying_records_the_error_and_next_run_without_finishing(store: Store) -> None:
    await insert(store, new())
    job = await claim_one(store)
    failed_at = T0 + timedelta(seconds=2)
    retry_at = failed_at + timedelta(seconds=30)

    applied = await store.ack_jobs(
        [ack_for(job, JobState.RETRYING, now=failed_at, error=BOOM, run_at=retry_at)], now=failed_at
    )

    assert applied == {job.id}
    stored = await get(store, job.id)
    assert stored.state is JobState.RETRYING
    assert stored.error == BOOM
    assert stored.run_at == retry_at
    assert stored.finished_at is None
    assert stored.lease_owner is None
    assert [(r.attempt, r.outcome, r.error) for r in stored.history] == [(1, Outcome.FAILED, BOOM)]
    # Not due before retry_at; claimed as attempt 2 then.
    assert await claim(store, now=retry_at - timedelta(seconds=1)) == []
    assert (await claim_one(store, now=retry_at)).attempt == 2


async def test_history_keeps_every_attempt_oldest_first(store: Store) -> None:
    await insert(store, new())
    first = await claim_one(store, owner="w#1")
    await store.ack_jobs([ack_for(first, JobState.RETRYING, now=T0, error=BOOM, run_at=T0)], now=T0)
    later = T0 + timedelta(seconds=1)
    second = await claim_one(store, owner="w#2", now=later)
    await store.ack_jobs([ack_for(second, JobState.SUCCEEDED, now=later, result=2)], now=later)

    stored = await get(store, first.id)

    assert [(r.attempt, r.worker, r.outcome) for r in stored.history] == [
        (1, "w#1", Outcome.FAILED),
        (2, "w#2", Outcome.SUCCEEDED),
    ]
    assert stored.result == 2


async def test_ack_dead_records_the_error_and_finished_at(store: Store) -> None:
    await insert(store, new(max_attempts=1))
    job = await claim_one(store)
    now = T0 + timedelta(seconds=1)

    applied = await store.ack_jobs([ack_for(job, JobState.DEAD, now=now, error=BOOM)], now=now)

    assert applied == {job.id}
    stored = await get(store, job.id)
    assert stored.state is JobState.DEAD
    assert stored.error == BOOM
    assert stored.result is None
    assert stored.finished_at == now
    assert [r.outcome for r in stored.history] == [Outcome.FAILED]


async def test_acks_for_several_jobs_land_together_and_report_each(store: Store) -> None:
    await insert(store, new(args=[1]), new(args=[2]))
    one, two = await claim(store)
    now = T0 + timedelta(seconds=1)

    applied = await store.ack_jobs(
        [ack_for(one, JobState.SUCCEEDED, now=now), ack_for(two, JobState.DEAD, now=now, error=BOOM)], now=now
    )

    assert applied == {one.id, two.id}
    assert (await get(store, one.id)).state is JobState.SUCCEEDED
    assert (await get(store, two.id)).state is JobState.DEAD


async def test_an_ack_alone_lands_as_the_same_ack_in_a_batch_does(store: Store) -> None:
    # PostgreSQL sends a lone ack as a row of parameters, a batch as one JSON document.
    await insert(store, *[new(args=[n]) for n in range(4)])
    jobs = await claim(store)
    now = T0 + timedelta(seconds=2)
    alone, batched = jobs[:2], jobs[2:]

    def acks(succeeded: Job, dead: Job) -> list[Ack]:
        return [
            ack_for(succeeded, JobState.SUCCEEDED, now=now, result={"ok": [1, None, 2**70]}),
            ack_for(dead, JobState.DEAD, now=now, error=BOOM),
        ]

    for ack in acks(*alone):
        assert await store.ack_jobs([ack], now=now) == {ack.job_id}
    assert await store.ack_jobs(acks(*batched), now=now) == {job.id for job in batched}

    def landed(job: Job) -> tuple[Any, ...]:
        return (job.state, job.result, job.error, job.attempt, job.finished_at, job.updated_at, job.history)

    for single, in_batch in zip(alone, batched, strict=True):
        assert landed(await get(store, single.id)) == landed(await get(store, in_batch.id))
    assert landed(await get(store, alone[0].id))[:2] == (JobState.SUCCEEDED, {"ok": [1, None, 2**70]})


async def test_late_ack_from_an_old_lease_changes_nothing_and_is_not_applied(store: Store) -> None:
    await insert(store, new())
    stale = await claim_one(store, owner="w1#1")
    after_expiry = T0 + timedelta(seconds=LEASE + 1)
    await store.rescue_jobs(now=after_expiry)
    current = await claim_one(store, owner="w2#1", now=after_expiry)
    before = await get(store, current.id)

    applied = await store.ack_jobs(
        [ack_for(stale, JobState.SUCCEEDED, now=after_expiry, result="late")], now=after_expiry
    )

    assert applied == set()
    assert await get(store, current.id) == before
    assert before.state is JobState.RUNNING
    assert before.lease_owner == "w2#1"


async def test_ack_with_a_wrong_lease_owner_changes_nothing(store: Store) -> None:
    await insert(store, new())
    job = await claim_one(store, owner="w#1")
    before = await get(store, job.id)

    applied = await store.ack_jobs([ack_for(job, JobState.SUCCEEDED, now=T0, owner="intruder#9")], now=T0)

    assert applied == set()
    assert await get(store, job.id) == before


async def test_a_second_ack_for_a_finished_attempt_changes_nothing(store: Store) -> None:
    await insert(store, new())
    job = await claim_one(store)
    await store.ack_jobs([ack_for(job, JobState.SUCCEEDED, now=T0, result=1)], now=T0)
    finished = await get(store, job.id)

    later = T0 + timedelta(seconds=5)
    applied = await store.ack_jobs([ack_for(job, JobState.DEAD, now=later, error=BOOM)], now=later)

    assert applied == set()
    assert await get(store, job.id) == finished


async def test_released_ack_requeues_the_job_and_gives_the_attempt_back(store: Store) -> None:
    await insert(store, new())
    job = await claim_one(store)
    now = T0 + timedelta(seconds=4)

    applied = await store.ack_jobs(
        [ack_for(job, JobState.QUEUED, now=now, outcome=Outcome.RELEASED, run_at=now, attempt_delta=-1)], now=now
    )

    assert applied == {job.id}
    stored = await get(store, job.id)
    assert stored.state is JobState.QUEUED
    assert stored.attempt == 0
    assert stored.run_at == now
    assert stored.finished_at is None
    assert [r.outcome for r in stored.history] == [Outcome.RELEASED]
    assert (await claim_one(store, now=now)).attempt == 1


# -- leases ------------------------------------------------------------------------------


async def test_heartbeat_extends_only_leases_still_held_and_reports_lost_ones(store: Store) -> None:
    await insert(store, new(args=["held"]), new(args=["finished"]))
    held = await claim_one(store, owner="w#1")
    finished = await claim_one(store, owner="w#2")
    await store.ack_jobs([ack_for(finished, JobState.SUCCEEDED, now=T0)], now=T0)
    beat = T0 + timedelta(seconds=10)

    still_held = await store.heartbeat_jobs(
        {held.id: "w#1", finished.id: "w#2", new_job_id(): "w#3"}, lease_seconds=LEASE, now=beat
    )

    assert still_held == {held.id}
    assert (await get(store, held.id)).lease_expires_at == beat + timedelta(seconds=LEASE)
    assert (await get(store, finished.id)).lease_expires_at is None


async def test_heartbeat_does_not_extend_a_lease_taken_over_by_another_owner(store: Store) -> None:
    await insert(store, new())
    stale = await claim_one(store, owner="w1#1")
    after_expiry = T0 + timedelta(seconds=LEASE + 1)
    await store.rescue_jobs(now=after_expiry)
    current = await claim_one(store, owner="w2#1", now=after_expiry)

    still_held = await store.heartbeat_jobs(
        {stale.id: "w1#1"}, lease_seconds=LEASE, now=after_expiry + timedelta(seconds=10)
    )

    assert still_held == set()
    assert await get(store, current.id) == current


async def test_heartbeat_matches_each_job_to_its_own_owner(store: Store) -> None:
    # Each claim gets its own lease token, so one heartbeat carries several owners. A job must
    # be extended only under the owner given for *that* job, not any owner in the call.
    await insert(store, new(args=["a"]), new(args=["b"]))
    first = await claim_one(store, owner="w#1")
    second = await claim_one(store, owner="w#2")

    still_held = await store.heartbeat_jobs(
        {first.id: "w#2", second.id: "w#1"}, lease_seconds=LEASE, now=T0 + timedelta(seconds=10)
    )

    assert still_held == set()
    assert await get(store, first.id) == first
    assert await get(store, second.id) == second


async def test_rescue_turns_an_expired_lease_into_a_retry_with_a_lost_record(store: Store) -> None:
    await insert(store, new(max_attempts=3))
    job = await claim_one(store, owner="w#1")

    assert await store.rescue_jobs(now=T0 + timedelta(seconds=LEASE - 1)) == []
    rescue_at = T0 + timedelta(seconds=LEASE + 1)
    rescued = await store.rescue_jobs(now=rescue_at)

    assert [j.id for j in rescued] == [job.id]
    stored = await get(store, job.id)
    assert stored.state is JobState.RETRYING
    assert stored.run_at == rescue_at
    assert stored.finished_at is None
    assert (stored.lease_owner, stored.lease_expires_at) == (None, None)
    assert stored.error is not None
    assert stored.error.type == "LeaseExpired"
    (record,) = stored.history
    assert (record.attempt, record.worker, record.outcome) == (1, "w#1", Outcome.LOST)
    assert (record.started_at, record.ended_at) == (T0, rescue_at)
    assert (await claim_one(store, now=rescue_at)).attempt == 2


async def test_rescue_marks_the_job_dead_when_it_has_no_attempts_left(store: Store) -> None:
    await insert(store, new(max_attempts=1))
    job = await claim_one(store)
    rescue_at = T0 + timedelta(seconds=LEASE + 1)

    await store.rescue_jobs(now=rescue_at)

    stored = await get(store, job.id)
    assert stored.state is JobState.DEAD
    assert stored.finished_at == rescue_at
    assert [r.outcome for r in stored.history] == [Outcome.LOST]
    assert await claim(store, now=rescue_at) == []


async def test_rescue_leaves_held_leases_and_other_states_alone(store: Store) -> None:
    await insert(store, new(args=["expired"]), new(args=["fresh"]), new(args=["queued"]))
    expired = await claim_one(store, owner="w#1")
    fresh = await claim_one(store, owner="w#2", now=T0 + timedelta(seconds=20))

    rescued = await store.rescue_jobs(now=T0 + timedelta(seconds=LEASE + 1))

    assert [j.id for j in rescued] == [expired.id]
    assert await get(store, fresh.id) == fresh
    assert sorted(j.state for j in await all_jobs(store)) == sorted(
        [JobState.RETRYING, JobState.RUNNING, JobState.QUEUED]
    )


async def test_concurrent_rescues_rescue_each_expired_job_exactly_once(store: Store, twin_store: Store) -> None:
    await insert(store, *(new(args=[n]) for n in range(40)))
    claimed = await claim(store, owner="crashed#1")
    rescue_at = T0 + timedelta(seconds=LEASE + 1)

    first, second = await asyncio.gather(store.rescue_jobs(now=rescue_at), twin_store.rescue_jobs(now=rescue_at))

    rescued_ids = [job.id for job in [*first, *second]]
    assert sorted(rescued_ids) == sorted(job.id for job in claimed)
    for job in await all_jobs(store):
        assert job.state is JobState.RETRYING
        assert [r.outcome for r in job.history] == [Outcome.LOST]


# -- pruning ------------------------------------------------------------------------------


async def test_prune_deletes_only_finished_jobs_older_than_the_cutoff_in_batches(store: Store) -> None:
    old_done = await insert(store, *(new(args=[n]) for n in range(4)), new(args=["cancel-me"]))
    claimed = await claim(store, limit=4)
    await store.ack_jobs(
        [ack_for(claimed[0], JobState.DEAD, now=T0, error=BOOM)]
        + [ack_for(job, JobState.SUCCEEDED, now=T0) for job in claimed[1:]],
        now=T0,
    )
    await store.cancel_job(old_done[4].id, now=T0)
    # Kept: finished after the cutoff, and jobs that have not finished, however old.
    (recent,) = await insert(store, new(args=["recent"]))
    await store.cancel_job(recent.id, now=T0 + timedelta(hours=2))
    (queued,) = await insert(store, new(args=["queued"]))
    (running,) = await insert(store, new(args=["running"], queue="busy"))
    await claim(store, queues=["busy"])
    (retrying,) = await insert(store, new(args=["retrying"], queue="flaky"))
    flaky = await claim(store, queues=["flaky"])
    await store.ack_jobs([ack_for(flaky[0], JobState.RETRYING, now=T0, error=BOOM, run_at=T0)], now=T0)

    deleted = await store.prune_jobs(finished_before=T0 + timedelta(hours=1), batch_size=2)

    assert deleted == 5
    left = {job.id for job in await all_jobs(store)}
    assert left == {recent.id, queued.id, running.id, retrying.id}
    assert await store.prune_jobs(finished_before=T0 + timedelta(hours=1), batch_size=2) == 0


# -- reading ------------------------------------------------------------------------------


async def test_list_jobs_filters_by_state_queue_task_and_created_range(store: Store) -> None:
    (a,) = await insert(store, new("resize", queue="images"), now=T0)
    (b,) = await insert(store, new("resize", queue="images", run_at=T0 + timedelta(days=1)), now=T0)
    (c,) = await insert(store, new("send", queue="emails"), now=T0 + timedelta(hours=1))
    (d,) = await insert(store, new("send", queue="images"), now=T0 + timedelta(hours=2))

    async def ids(job_filter: JobFilter) -> set[str]:
        return {job.id for job in (await store.list_jobs(job_filter)).jobs}

    assert await ids(JobFilter()) == {a.id, b.id, c.id, d.id}
    assert await ids(JobFilter(states=(JobState.SCHEDULED,))) == {b.id}
    assert await ids(JobFilter(states=(JobState.SCHEDULED, JobState.QUEUED))) == {a.id, b.id, c.id, d.id}
    assert await ids(JobFilter(queue="images")) == {a.id, b.id, d.id}
    assert await ids(JobFilter(task="send")) == {c.id, d.id}
    assert await ids(JobFilter(queue="images", task="send")) == {d.id}
    assert await ids(JobFilter(created_after=T0 + timedelta(hours=1))) == {c.id, d.id}
    assert await ids(JobFilter(created_before=T0 + timedelta(hours=1))) == {a.id, b.id}
    window = JobFilter(created_after=T0 + timedelta(minutes=30), created_before=T0 + timedelta(minutes=90))
    assert await ids(window) == {c.id}
    assert await ids(JobFilter(states=(JobState.DEAD,))) == set()


async def test_list_jobs_pages_newest_first_with_a_cursor(store: Store) -> None:
    inserted = [job for n in range(5) for job in await insert(store, new(args=[n]))]
    newest_first = [job.id for job in reversed(inserted)]

    pages: list[list[str]] = []
    cursor = None
    while True:
        page = await store.list_jobs(JobFilter(), cursor=cursor, limit=2)
        pages.append([job.id for job in page.jobs])
        if page.next_cursor is None:
            break
        cursor = page.next_cursor

    assert pages == [newest_first[0:2], newest_first[2:4], newest_first[4:5]]


async def test_list_jobs_last_full_page_has_no_cursor(store: Store) -> None:
    await insert(store, *(new(args=[n]) for n in range(4)))

    first = await store.list_jobs(JobFilter(), limit=2)
    second = await store.list_jobs(JobFilter(), cursor=first.next_cursor, limit=2)

    assert first.next_cursor is not None
    assert len(second.jobs) == 2
    assert second.next_cursor is None


async def test_list_jobs_pages_stay_stable_when_jobs_are_added_between_pages(store: Store) -> None:
    original = [job for n in range(6) for job in await insert(store, new(args=[n]))]
    expected = [job.id for job in reversed(original)]

    first = await store.list_jobs(JobFilter(), limit=3)
    await insert(store, *(new(args=[f"new-{n}"]) for n in range(3)), now=T0 + timedelta(seconds=1))
    second = await store.list_jobs(JobFilter(), cursor=first.next_cursor, limit=3)

    assert [job.id for job in first.jobs] + [job.id for job in second.jobs] == expected
    assert second.next_cursor is None


async def test_queue_stats_count_jobs_by_state_and_report_the_oldest_runnable(store: Store) -> None:
    await insert(
        store,
        new(run_at=T0 - timedelta(minutes=10)),
        new(run_at=T0 - timedelta(minutes=3)),
        new(run_at=T0 + timedelta(hours=1)),
        new(queue="emails"),
    )
    (running,) = await insert(store, new(priority=100, run_at=T0 - timedelta(hours=5)))
    assert (await claim_one(store)).id == running.id
    email = await claim_one_from(store, "emails")
    await store.ack_jobs([ack_for(email, JobState.SUCCEEDED, now=T0)], now=T0)

    stats = await store.queue_stats()

    assert [s.queue for s in stats] == ["default", "emails"]
    default, emails = stats
    assert default.counts == {JobState.QUEUED: 2, JobState.SCHEDULED: 1, JobState.RUNNING: 1}
    assert default.oldest_runnable_at == T0 - timedelta(minutes=10)
    assert default.oldest_runnable_at is not None
    assert default.oldest_runnable_at.utcoffset() == timedelta(0)
    assert emails.counts == {JobState.SUCCEEDED: 1}
    assert emails.oldest_runnable_at is None


async def test_queue_stats_of_an_empty_store_is_empty(store: Store) -> None:
    assert await store.queue_stats() == []


async def test_get_job_of_an_unknown_id_is_none(store: Store) -> None:
    assert await store.get_job(new_job_id()) is None


async def test_reads_of_single_jobs_asked_together_each_get_their_own_job(store: Store) -> None:
    stored = await insert(store, *(new(args=[number]) for number in range(30)))
    asked = [job.id for job in stored] + [stored[0].id, new_job_id()]

    found = await asyncio.wait_for(asyncio.gather(*(store.get_job(job_id) for job_id in asked)), 10)

    assert found[:30] == stored
    assert found[30] == stored[0], "an id asked twice at once is answered twice"
    assert found[31] is None


async def test_a_reader_that_gives_up_leaves_the_others_answered(store: Store) -> None:
    first, second = await insert(store, new(), new())
    leaving = asyncio.create_task(store.get_job(first.id))
    staying = asyncio.create_task(store.get_job(second.id))
    await asyncio.sleep(0)  # both have asked

    leaving.cancel()

    assert await asyncio.wait_for(staying, 10) == second
    with pytest.raises(asyncio.CancelledError):
        await leaving
    assert await store.get_job(first.id) == first


async def test_a_failed_read_fails_every_reader_waiting_on_it_and_the_next_read_works(
    store: Store, twin_store: Store
) -> None:
    (job,) = await insert(store, new())
    await store.get_job(job.id)  # the connection and its statement are ready before the table goes
    assert isinstance(twin_store, SqlStore)
    async with twin_store.engine.begin() as conn:
        await conn.exec_driver_sql("ALTER TABLE conveyor_jobs RENAME TO conveyor_jobs_away")
    try:
        reads = asyncio.gather(*(store.get_job(job.id) for _ in range(3)), return_exceptions=True)
        outcomes = await asyncio.wait_for(reads, 30)
    finally:
        async with twin_store.engine.begin() as conn:
            await conn.exec_driver_sql("ALTER TABLE conveyor_jobs_away RENAME TO conveyor_jobs")

    assert all(isinstance(outcome, StorageError) for outcome in outcomes), outcomes
    assert await store.get_job(job.id) == job


# -- operator actions ------------------------------------------------------------------------------


async def test_cancel_stops_queued_scheduled_and_retrying_jobs(store: Store) -> None:
    queued, scheduled, retrying = await insert(
        store, new(queue="q"), new(queue="q", run_at=T0 + timedelta(hours=1)), new(queue="r")
    )
    failing = await claim_one_from(store, "r")
    await store.ack_jobs([ack_for(failing, JobState.RETRYING, now=T0, error=BOOM, run_at=T0)], now=T0)
    assert (await get(store, retrying.id)).state is JobState.RETRYING
    now = T0 + timedelta(minutes=1)

    for job in (queued, scheduled, retrying):
        cancelled = await store.cancel_job(job.id, now=now)
        assert cancelled.state is JobState.CANCELLED
        assert cancelled.finished_at == now
        assert await get(store, job.id) == cancelled

    assert await claim(store, queues=["q", "r"], now=T0 + timedelta(days=1)) == []


async def test_cancel_refuses_finished_jobs(store: Store) -> None:
    await insert(store, new(args=["done"]))
    done = await claim_one(store)
    await store.ack_jobs([ack_for(done, JobState.SUCCEEDED, now=T0)], now=T0)

    before = await get(store, done.id)
    with pytest.raises(JobStateError) as caught:
        await store.cancel_job(done.id, now=T0)
    assert caught.value.state == JobState.SUCCEEDED
    assert caught.value.operation == "cancel"
    assert await get(store, done.id) == before


async def test_cancelling_a_running_job_asks_its_worker_to_stop(store: Store) -> None:
    await insert(store, new(args=["running"]))
    running = await claim_one(store)

    asked = await store.cancel_job(running.id, now=T0)
    again = await store.cancel_job(running.id, now=T0 + timedelta(seconds=5))

    assert (asked.state, asked.cancel_requested_at) == (JobState.RUNNING, T0)
    assert again.cancel_requested_at == T0, "the first request's time is kept"
    assert await store.cancel_requested_among([running.id, new_job_id()]) == {running.id}


async def test_a_retry_ack_of_a_job_asked_to_stop_ends_it_cancelled(store: Store) -> None:
    await insert(store, new(args=["running"], max_attempts=5))
    running = await claim_one(store)
    await store.cancel_job(running.id, now=T0)

    await store.ack_jobs([ack_for(running, JobState.RETRYING, now=T0)], now=T0)

    final = await get(store, running.id)
    assert final.state is JobState.CANCELLED
    assert final.finished_at == T0


async def test_cancel_of_an_unknown_job_raises_not_found(store: Store) -> None:
    missing = new_job_id()

    with pytest.raises(JobNotFoundError) as caught:
        await store.cancel_job(missing, now=T0)

    assert caught.value.job_id == missing


async def test_retry_requeues_a_dead_job_with_its_attempts_reset(store: Store) -> None:
    await insert(store, new(max_attempts=1))
    job = await claim_one(store)
    await store.ack_jobs([ack_for(job, JobState.DEAD, now=T0, error=BOOM)], now=T0)
    replay_at = T0 + timedelta(hours=1)

    replayed = await store.retry_job(job.id, now=replay_at)

    assert replayed.state is JobState.QUEUED
    assert replayed.attempt == 0
    assert replayed.run_at == replay_at
    assert replayed.finished_at is None
    assert await get(store, job.id) == replayed
    again = await claim_one(store, now=replay_at)
    assert (again.id, again.attempt) == (job.id, 1)


async def test_retry_requeues_a_cancelled_job(store: Store) -> None:
    (job,) = await insert(store, new(run_at=T0 + timedelta(days=1)))
    await store.cancel_job(job.id, now=T0)

    replayed = await store.retry_job(job.id, now=T0 + timedelta(minutes=1))

    assert replayed.state is JobState.QUEUED
    assert replayed.run_at == T0 + timedelta(minutes=1)
    assert replayed.finished_at is None


async def test_retry_refuses_jobs_that_are_not_dead_or_cancelled(store: Store) -> None:
    queued, running, done = await insert(store, new(args=[1]), new(args=[2], queue="x"), new(args=[3], queue="y"))
    await claim_one_from(store, "x")
    finished = await claim_one_from(store, "y")
    await store.ack_jobs([ack_for(finished, JobState.SUCCEEDED, now=T0)], now=T0)

    for job in (queued, running, done):
        before = await get(store, job.id)
        with pytest.raises(JobStateError) as caught:
            await store.retry_job(job.id, now=T0)
        assert caught.value.operation == "retry"
        assert await get(store, job.id) == before
    with pytest.raises(JobNotFoundError):
        await store.retry_job(new_job_id(), now=T0)


# -- values ------------------------------------------------------------------------------


async def test_big_integers_and_numeric_looking_strings_round_trip_exactly(store: Store) -> None:
    # A JSON column with NUMERIC affinity (SQLite) turns "5" into 5 and 2**70 into a float.
    args = [2**70, -(2**70), "5", 5, "5.0", 1.5, "12345678901234567890123"]
    kwargs = {"big": 2**70, "text": "5"}
    (job,) = await insert(store, new(args=args, kwargs=kwargs))
    running = await claim_one(store)

    await store.ack_jobs([ack_for(running, JobState.SUCCEEDED, now=T0, result=2**70)], now=T0)
    stored = await get(store, job.id)

    assert stored.args == args
    assert [type(value) for value in stored.args] == [int, int, str, int, str, float, str]
    assert stored.kwargs == kwargs
    assert type(stored.kwargs["big"]) is int
    assert stored.result == 2**70
    assert type(stored.result) is int


@pytest.mark.parametrize("result", ["5", 5, "2.50", [2**70, "7"], {"n": "5"}], ids=repr)
async def test_results_keep_their_exact_json_type(store: Store, result: Any) -> None:
    await insert(store, new())
    job = await claim_one(store)

    await store.ack_jobs([ack_for(job, JobState.SUCCEEDED, now=T0, result=result)], now=T0)
    stored = await get(store, job.id)

    assert stored.result == result
    assert type(stored.result) is type(result)
    if isinstance(result, list):
        assert [type(v) for v in stored.result] == [int, str]


async def test_datetimes_come_back_timezone_aware_in_utc(store: Store) -> None:
    plus_two = timezone(timedelta(hours=2))
    now = datetime(2026, 3, 1, 15, 0, tzinfo=plus_two)  # 13:00 UTC
    run_at = datetime(2026, 3, 1, 16, 30, 15, 123456, tzinfo=plus_two)  # 14:30:15.123456 UTC
    (job,) = await insert(store, new(run_at=run_at, max_attempts=1), now=now)
    claimed = await claim_one(store, now=run_at)
    running = await get(store, job.id)
    # History entries are JSON written from the ack's own datetimes: the rescuer's clock is UTC.
    await store.rescue_jobs(now=(run_at + timedelta(seconds=LEASE + 1)).astimezone(UTC))
    dead = await get(store, job.id)
    (stats,) = await store.queue_stats()
    (listed,) = (await store.list_jobs(JobFilter())).jobs

    stamps = {
        "insert.run_at": job.run_at,
        "insert.created_at": job.created_at,
        "claim.attempted_at": claimed.attempted_at,
        "running.lease_expires_at": running.lease_expires_at,
        "running.run_at": running.run_at,
        "running.created_at": running.created_at,
        "dead.updated_at": dead.updated_at,
        "dead.finished_at": dead.finished_at,
        "dead.record.started_at": dead.history[0].started_at,
        "dead.record.ended_at": dead.history[0].ended_at,
        "listed.created_at": listed.created_at,
    }
    for name, value in stamps.items():
        assert value is not None, name
        assert value.utcoffset() == timedelta(0), name
        assert value.tzinfo == UTC, name
    assert running.created_at == now
    assert running.created_at.hour == 13
    assert running.run_at == run_at
    assert (running.run_at.hour, running.run_at.microsecond) == (14, 123456)
    assert stats.oldest_runnable_at is None


@pytest.mark.parametrize("backend_url", ["sqlite"], indirect=True)
async def test_sqlite_keeps_its_connections_open_under_concurrent_reads(backend_url: str) -> None:
    store = await open_store(Settings(database_url=backend_url, pool_size=4))
    assert isinstance(store, SqlStore)
    opened: list[object] = []
    event.listen(store.engine.sync_engine, "connect", lambda connection, _record: opened.append(connection))
    after_each_round = []
    try:
        for _ in range(3):
            await asyncio.gather(*(store.list_jobs(JobFilter(), limit=5) for _ in range(20)))
            after_each_round.append(len(opened))
    finally:
        await store.close()

    # Opening one costs a thread and its PRAGMAs: each is opened once and kept, up to pool_size.
    assert after_each_round[0] == after_each_round[-1] <= 4, after_each_round
