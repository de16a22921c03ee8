"""PostgreSQL's per-job statements (enqueue, claim, ack, read) go straight to the driver, on
asyncpg's own pool: these tests hold that path to the same promises as the rest of the store."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta

import asyncpg
import pytest
from tests.storage.test_store import T0
from tests.support import postgres

from conveyor.jobs import Ack, AttemptRecord, JobFilter, JobState, NewJob, Outcome
from conveyor.settings import Settings
from conveyor.storage import Store, open_store
from conveyor.storage import postgres as pg

pytestmark = pytest.mark.postgres


@pytest.fixture
async def store(postgres_database: str) -> AsyncIterator[Store]:
    await postgres.truncate(postgres_database)
    opened = await open_store(Settings(database_url=postgres_database))
    yield opened
    await opened.close()


async def _end_sessions(url: str) -> int:
    """Have the server end every session Conveyor has open on the database, as a restart would."""
    admin = await asyncpg.connect(url)
    try:
        return await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name = 'conveyor' AND pid <> pg_backend_pid()"
        )
    finally:
        await admin.close()


async def test_the_per_job_statements_carry_on_after_the_server_ends_their_sessions(
    store: Store, postgres_database: str
) -> None:
    (first,) = await store.insert_jobs([NewJob(task="task", args=[], kwargs={})], now=T0)
    assert await _end_sessions(postgres_database) >= 1, "the store's driver connection was open"

    (second,) = await store.insert_jobs([NewJob(task="task", args=[], kwargs={})], now=T0)
    await _end_sessions(postgres_database)
    claimed = await store.fetch_jobs(queues=["default"], limit=10, lease_owner="w#1", lease_seconds=30, now=T0)
    await _end_sessions(postgres_database)
    record = AttemptRecord(attempt=1, worker="w", started_at=T0, ended_at=T0, outcome=Outcome.SUCCEEDED)
    acks = [
        Ack(job_id=job.id, lease_owner="w#1", workflow_id=None, state=JobState.SUCCEEDED, record=record)
        for job in claimed
    ]
    applied = await store.ack_jobs(acks, now=T0)
    await _end_sessions(postgres_database)
    read = await store.get_job(second.id)

    assert {job.id for job in claimed} == applied == {first.id, second.id}
    assert read is not None
    assert read.state is JobState.SUCCEEDED


async def test_a_process_holds_no_more_connections_than_its_pool_settings_allow(postgres_database: str) -> None:
    await postgres.truncate(postgres_database)
    opened = await open_store(Settings(database_url=postgres_database, pool_size=2, max_overflow=2))
    admin = await asyncpg.connect(postgres_database)
    seen: list[int] = []
    try:
        (job,) = await opened.insert_jobs([NewJob(task="task", args=[], kwargs={})], now=T0)

        async def load() -> None:
            # Per-job reads (the driver's pool) and listings (SQLAlchemy's), many at once.
            for _ in range(10):
                reads = [opened.get_job(job.id) for _ in range(20)]
                listings = [opened.list_jobs(JobFilter(), limit=5) for _ in range(20)]
                await asyncio.gather(*reads, *listings)

        loading = asyncio.create_task(load())
        while not loading.done():
            seen.append(
                await admin.fetchval(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND application_name = 'conveyor'"
                )
            )
        await loading
    finally:
        await admin.close()
        await opened.close()

    assert 2 <= max(seen) <= 4, f"connections seen under load: {sorted(set(seen))}"


async def test_a_claims_unflushed_commit_stays_with_the_claim(store: Store, postgres_database: str) -> None:
    # A claim commits without waiting for the disk; the connection then goes back to the pool,
    # where the next statement may be an enqueue, which must wait for the disk as always.
    await store.insert_jobs([NewJob(task="task", args=[], kwargs={})], now=T0)
    connection = await asyncpg.connect(postgres_database)
    try:
        claimed = await pg.claim_in_one_statement(
            connection, queues=["default"], limit=10, lease_owner="w#1", lease_expires_at=T0, now=T0
        )
        after = await connection.fetchval("SHOW synchronous_commit")
    finally:
        await connection.close()

    assert len(claimed) == 1
    assert after == "on"


@pytest.mark.parametrize("turns", [1, 3, 10, 30])
async def test_a_bulk_insert_cancelled_midway_stores_all_of_its_jobs_or_none(store: Store, turns: int) -> None:
    # Cancelled after that many turns of the loop: while BEGIN is out, while a part is built or
    # stored, or later.
    batch = [NewJob(task="task", args=[n], kwargs={}) for n in range(500)]
    inserting = asyncio.ensure_future(store.insert_jobs(batch, now=T0))
    for _ in range(turns):
        await asyncio.sleep(0)
    if inserting.done():
        pytest.skip(f"the insert finished within {turns} turns of the loop")

    inserting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await inserting

    stored = (await store.list_jobs(JobFilter(), limit=1000)).jobs
    assert len(stored) in (0, 500), "a batch is one transaction"
    (after,) = await store.insert_jobs([NewJob(task="task", args=["after"], kwargs={})], now=T0)
    assert await store.get_job(after.id) == after, "the driver's pool still serves"


async def test_a_bulk_insert_asks_the_server_about_no_type(
    store: Store, postgres_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # asyncpg looks up a parameter type it has no codec for (int[], float8[], timestamptz[]) on
    # each new connection, 10 to 30 ms the first time: most of a first bulk enqueue's time.
    looked_up: list[object] = []
    introspect = asyncpg.Connection._introspect_types

    async def recording(self: asyncpg.Connection, typeoids: object, timeout: object) -> object:
        looked_up.append(typeoids)
        return await introspect(self, typeoids, timeout)

    monkeypatch.setattr(asyncpg.Connection, "_introspect_types", recording)
    # Priority, attempts, due time and timeout vary, so their arrays are sent; the store's
    # connection has not sent this statement before.
    batch = [
        NewJob(task="task", args=[n], kwargs={}, priority=n, max_attempts=1 + n, run_at=T0, timeout_seconds=0.5 + n)
        for n in range(100)
    ]
    batch[0] = NewJob(task="task", args=[], kwargs={}, run_at=T0 - timedelta(seconds=1))
    stored = await store.insert_jobs(batch, now=T0)

    assert looked_up == []
    assert [job.id for job in (await store.list_jobs(JobFilter(), limit=200)).jobs] == sorted(
        (job.id for job in stored), reverse=True
    )


async def test_the_store_opens_its_driver_connection_as_it_opens(postgres_database: str) -> None:
    # The first enqueue or claim would otherwise wait for a connection to open (about 4 ms): the
    # schema check's connection is SQLAlchemy's, and the driver's own pool opens one more.
    opened = await open_store(Settings(database_url=postgres_database))
    try:
        admin = await asyncpg.connect(postgres_database)
        try:
            sessions = await admin.fetchval(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() AND application_name = 'conveyor'"
            )
        finally:
            await admin.close()
    finally:
        await opened.close()
    assert sessions == 2
