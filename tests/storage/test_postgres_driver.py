"""PostgreSQL's per-job statements (enqueue, claim, ack, read) go straight to the driver, on
a pool of bare asyncpg connections: these tests hold that path, and the pool, to the same
promises as the rest of the store."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import timedelta

import asyncpg
import pytest
from tests.storage.test_store import T0
from tests.support import postgres
from tests.support.waiting import eventually, settle

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


# -- the driver's pool --------------------------------------------------------------------


@pytest.fixture
async def pool(postgres_database: str) -> AsyncIterator[pg.DriverPool]:
    opened = pg.DriverPool(postgres_database, max_size=2, acquire_timeout=10, connect_args={})
    await opened.open()
    yield opened
    await opened.close()


async def _backend(pool: pg.DriverPool) -> int:
    async with pool.connection() as connection:
        return await connection.fetchval("SELECT pg_backend_pid()")


async def _alive(url: str, pids: set[int]) -> set[int]:
    admin = await asyncpg.connect(url)
    try:
        rows = await admin.fetch("SELECT pid FROM pg_stat_activity WHERE pid = ANY($1::int[])", list(pids))
    finally:
        await admin.close()
    return {row["pid"] for row in rows}


async def test_the_pool_reuses_one_connection_for_statements_one_after_another(pool: pg.DriverPool) -> None:
    assert len({await _backend(pool) for _ in range(5)}) == 1


async def test_a_caller_beyond_the_pools_size_waits_for_a_connection_to_come_back(pool: pg.DriverPool) -> None:
    held = [pool.connection() for _ in range(2)]
    first, second = [await hold.__aenter__() for hold in held]
    third = asyncio.ensure_future(_backend(pool))
    await asyncio.sleep(0.05)
    assert not third.done(), "the pool opened a third connection"

    second_pid = await second.fetchval("SELECT pg_backend_pid()")
    await held[1].__aexit__(None, None, None)
    assert await third == second_pid
    await held[0].__aexit__(None, None, None)
    assert first.is_closed() is False


async def test_a_caller_waits_no_longer_than_the_acquire_timeout(postgres_database: str) -> None:
    pool = pg.DriverPool(postgres_database, max_size=1, acquire_timeout=0.05, connect_args={})
    try:
        async with pool.connection():
            with pytest.raises(TimeoutError):
                await _backend(pool)
        assert await _backend(pool) > 0, "the timed-out caller left the pool as it was"
    finally:
        await pool.close()


async def test_a_server_error_leaves_the_connection_in_use(pool: pg.DriverPool) -> None:
    before = await _backend(pool)
    with pytest.raises(asyncpg.DivisionByZeroError):
        async with pool.connection() as connection:
            await connection.fetchval("SELECT 1 / 0")
    assert await _backend(pool) == before


@pytest.mark.parametrize("ending", ["cancelled", "timed_out", "left_in_a_transaction", "python_error"])
async def test_a_connection_that_may_not_be_ready_is_closed_and_replaced(
    pool: pg.DriverPool, postgres_database: str, ending: str
) -> None:
    before = await _backend(pool)

    async def use() -> None:
        async with pool.connection() as connection:
            if ending == "cancelled":
                await connection.fetchval("SELECT pg_sleep(60)")
            elif ending == "timed_out":
                await connection.fetchval("SELECT pg_sleep(60)", timeout=0.05)
            elif ending == "left_in_a_transaction":
                await connection.execute("BEGIN")
            else:
                raise LookupError(ending)

    using = asyncio.ensure_future(use())
    if ending == "cancelled":
        await asyncio.sleep(0.05)
        using.cancel()
    with contextlib.suppress(asyncio.CancelledError, TimeoutError, LookupError):
        await using

    after = await _backend(pool)
    assert after != before
    # A statement cut short is cancelled on the server too, not left to sleep its minute out.
    for _ in range(500):
        if not await _alive(postgres_database, {before}):
            break
        await asyncio.sleep(0.01)
    assert not await _alive(postgres_database, {before}), "the old session ended with its statement"


async def test_a_caller_waiting_when_a_connection_is_closed_opens_another(pool: pg.DriverPool) -> None:
    held = [pool.connection() for _ in range(2)]
    for hold in held:
        await hold.__aenter__()
    waiting = asyncio.ensure_future(_backend(pool))
    await asyncio.sleep(0.05)

    await held[0].__aexit__(LookupError, LookupError("failed"), None)

    assert await waiting > 0
    await held[1].__aexit__(None, None, None)


async def test_idle_connections_beyond_one_close_once_they_have_been_idle_long(
    pool: pg.DriverPool, postgres_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def both() -> set[int]:
        async with pool.connection() as a, pool.connection() as b:
            return {await a.fetchval("SELECT pg_backend_pid()"), await b.fetchval("SELECT pg_backend_pid()")}

    pids = await both()
    assert len(pids) == 2
    monkeypatch.setattr(pg, "_IDLE_LIFETIME_SECONDS", 0.0)
    await _backend(pool)

    for _ in range(100):
        if len(await _alive(postgres_database, pids)) == 1:
            break
        await asyncio.sleep(0.01)
    assert len(await _alive(postgres_database, pids)) == 1
    assert await _backend(pool) in pids


async def test_a_closed_pool_refuses_callers_and_closes_what_comes_back(pool: pg.DriverPool) -> None:
    holding = pool.connection()
    held = await holding.__aenter__()
    await pool.close()

    with pytest.raises(asyncpg.InterfaceError):
        await _backend(pool)
    await holding.__aexit__(None, None, None)
    assert held.is_closed()


# -- the listener ---------------------------------------------------------------------------


async def _finish_a_job(store: Store) -> str:
    (job,) = await store.insert_jobs([NewJob(task="task", args=[], kwargs={})], now=T0)
    (claimed,) = await store.fetch_jobs(queues=["default"], limit=1, lease_owner="w#1", lease_seconds=30, now=T0)
    record = AttemptRecord(attempt=1, worker="w", started_at=T0, ended_at=T0, outcome=Outcome.SUCCEEDED)
    ack = Ack(job_id=claimed.id, lease_owner="w#1", workflow_id=None, state=JobState.SUCCEEDED, record=record)
    assert await store.ack_jobs([ack], now=T0) == {job.id}
    return job.id


def _listener_of(store: Store) -> pg.Listener:
    listener = getattr(store, "_listener", None)  # the store's own part, looked at from outside
    assert isinstance(listener, pg.Listener), "the store listens from its first wait or subscription"
    return listener


async def _listening_on(store: Store, channel: str) -> None:
    listener = _listener_of(store)
    await eventually(lambda: _true(channel in listener.listening), timeout=30, interval=0.005)


async def _true(value: bool) -> bool:
    return value


async def _woken_by_an_enqueue(store: Store, other: Store) -> None:
    waiting = asyncio.create_task(store.wait_for_jobs(30))
    loop = asyncio.get_running_loop()
    started = loop.time()

    await other.insert_jobs([NewJob(task="task", args=[], kwargs={})], now=T0)
    await waiting

    assert loop.time() - started < 5, "woken by the enqueue's NOTIFY, not by the timeout"


async def test_a_waiting_store_listens_for_finished_jobs_only_once_asked_to(
    store: Store, postgres_database: str
) -> None:
    other = await open_store(Settings(database_url=postgres_database))
    try:
        await settle(store)
        # A worker waits for jobs: every ack of every worker would wake it on the other channel.
        assert _listener_of(store).listening == {pg.JOBS_CHANNEL}
        announced: asyncio.Queue[set[str]] = asyncio.Queue()

        store.on_jobs_finished(announced.put_nowait)
        await _listening_on(store, pg.FINISHED_CHANNEL)
        job_id = await _finish_a_job(other)

        assert await asyncio.wait_for(announced.get(), 10) == {job_id}
    finally:
        await other.close()


async def test_a_store_listening_for_finished_jobs_hears_of_enqueues_once_it_waits(
    store: Store, postgres_database: str
) -> None:
    other = await open_store(Settings(database_url=postgres_database))
    try:
        store.on_jobs_finished(lambda _ids: None)
        await _listening_on(store, pg.FINISHED_CHANNEL)
        assert _listener_of(store).listening == {pg.FINISHED_CHANNEL}
        await store.wait_for_jobs(0)
        await _listening_on(store, pg.JOBS_CHANNEL)
        await store.wait_for_jobs(0)  # the wake-up that comes with a new channel

        await _woken_by_an_enqueue(store, other)
    finally:
        await other.close()


async def test_a_store_that_stops_listening_gives_up_the_channel_until_it_waits_again(
    store: Store, postgres_database: str
) -> None:
    other = await open_store(Settings(database_url=postgres_database))
    try:
        await settle(store)
        listener = _listener_of(store)

        store.stop_listening()
        await eventually(lambda: _true(pg.JOBS_CHANNEL not in listener.listening), timeout=30, interval=0.005)
        await store.wait_for_jobs(0)  # listens again, and wakes at once for what came meanwhile
        await _listening_on(store, pg.JOBS_CHANNEL)
        await asyncio.wait_for(store.wait_for_jobs(30), 10)

        await _woken_by_an_enqueue(store, other)
    finally:
        await other.close()
