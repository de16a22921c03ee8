"""Enqueue inside the caller's own transaction: the job exists exactly when the business data does."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from conveyor import Conveyor, JobState
from conveyor.settings import normalize_database_url
from conveyor.testing import drain, enqueued_jobs


@pytest.fixture
async def business_engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    """The application's own engine on the same database, with a table of its own."""
    engine = create_async_engine(normalize_database_url(database_url))
    async with engine.begin() as conn:
        await conn.execute(sa.text("DROP TABLE IF EXISTS orders"))
        await conn.execute(sa.text("CREATE TABLE orders (id INTEGER PRIMARY KEY)"))
    yield engine
    await engine.dispose()


@pytest.fixture
def ship(app: Conveyor):
    @app.task
    async def ship_order(order_id: int) -> int:
        return order_id

    return ship_order


async def test_a_job_enqueued_on_a_rolled_back_connection_never_exists(
    app: Conveyor, business_engine: AsyncEngine, ship
) -> None:
    async with business_engine.connect() as conn:
        transaction = await conn.begin()
        await conn.execute(sa.text("INSERT INTO orders (id) VALUES (1)"))
        await ship.using(connection=conn).enqueue(1)
        await transaction.rollback()

    assert await enqueued_jobs(app) == []
    await drain(app)
    assert await enqueued_jobs(app) == []


async def test_a_job_enqueued_on_a_committed_connection_runs(app: Conveyor, business_engine: AsyncEngine, ship) -> None:
    async with business_engine.begin() as conn:
        await conn.execute(sa.text("INSERT INTO orders (id) VALUES (2)"))
        job = await ship.using(connection=conn).enqueue(2)

    await drain(app)
    finished = await app.get_job(job.id)
    assert (finished.state, finished.result) == (JobState.SUCCEEDED, 2)


async def test_a_session_transaction_carries_the_job_too(app: Conveyor, business_engine: AsyncEngine, ship) -> None:
    async with AsyncSession(business_engine) as session:
        await session.execute(sa.text("INSERT INTO orders (id) VALUES (3)"))
        rolled_back = await ship.using(connection=session).enqueue(3)
        await session.rollback()
    async with AsyncSession(business_engine) as session, session.begin():
        await session.execute(sa.text("INSERT INTO orders (id) VALUES (4)"))
        committed = await app.enqueue("ship_order", [4], connection=session)

    await drain(app)
    assert [job.id for job in await enqueued_jobs(app)] == [committed.id]
    assert rolled_back.id != committed.id
    assert (await app.get_job(committed.id)).state is JobState.SUCCEEDED


async def test_a_raw_asyncpg_transaction_carries_the_job(app: Conveyor, database_url: str, ship) -> None:
    if not database_url.startswith("postgresql"):
        pytest.skip("asyncpg connections are PostgreSQL's")
    connection = await asyncpg.connect(database_url)
    try:
        await connection.execute("DROP TABLE IF EXISTS orders; CREATE TABLE orders (id INTEGER PRIMARY KEY)")
        transaction = connection.transaction()
        await transaction.start()
        await connection.execute("INSERT INTO orders (id) VALUES (5)")
        await ship.using(connection=connection).enqueue(5)
        await transaction.rollback()
        async with connection.transaction():
            await connection.execute("INSERT INTO orders (id) VALUES (6)")
            kept = await ship.using(connection=connection, idempotency_key="order-6").enqueue(6)
            again = await ship.using(connection=connection, idempotency_key="order-6").enqueue(6)
    finally:
        await connection.close()

    assert again.id == kept.id, "the key is honoured inside the caller's transaction too"
    await drain(app)
    jobs = await enqueued_jobs(app)
    assert [(job.id, job.state, job.result) for job in jobs] == [(kept.id, JobState.SUCCEEDED, 6)]
