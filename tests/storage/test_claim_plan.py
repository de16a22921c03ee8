"""The claim reads the runnable index in claim order, stops at its limit, and updates what it chose by key.

If it sorted every due job instead, or read the whole table to find the chosen ones, each claim
would cost as much as the table is long and draining a backlog would take quadratic time:
correct results, so only the plan shows it.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from conveyor.jobs import NewJob
from conveyor.settings import Settings
from conveyor.storage import dialects, open_store
from conveyor.storage import postgres as pg
from conveyor.storage.sql import SqlStore

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)
BACKLOG = 500


@pytest.fixture
async def backlogged(backend_url: str) -> AsyncIterator[SqlStore]:
    store = await open_store(Settings(database_url=backend_url))
    assert isinstance(store, SqlStore)
    await store.insert_jobs([NewJob(task="t", args=[], kwargs={}) for _ in range(BACKLOG)], now=T0)
    yield store
    await store.close()


@pytest.mark.postgres
@pytest.mark.parametrize("backend_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)
async def test_a_postgres_claim_walks_the_index_in_order_with_no_sort_and_no_bitmap(backlogged: SqlStore) -> None:
    # Jobs the claim must not read: ten times the backlog, due next year.
    later = [NewJob(task="t", args=[], kwargs={}, run_at=T0 + 365 * 24 * HOUR) for _ in range(10 * BACKLOG)]
    await backlogged.insert_jobs(later, now=T0)
    async with backlogged._read_engine.connect() as conn:
        await conn.execute(sa.text("ANALYZE conveyor_jobs"))  # as autovacuum would: planned on the table's real size
        raw = (await conn.get_raw_connection()).driver_connection
        one = await _plan(raw, pg._CLAIM_ONE_QUEUE_SQL, "default")
        several = await _plan(raw, pg._CLAIM_QUEUES_SQL, ["default", "emails"])

    assert "ix_conveyor_jobs_runnable" in one
    assert "Sort" not in one
    assert "Bitmap" not in one
    # The chosen jobs are then updated by key, not found by reading the whole table, finished jobs and all.
    for plan in (one, several):
        assert "Index Scan using pk_conveyor_jobs" in plan
        assert "Seq Scan" not in plan
    # Several queues: each is read in index order up to the limit; only those few rows are sorted.
    assert "ix_conveyor_jobs_runnable" in several
    assert "Bitmap" not in several
    assert several.count("Sort Key") == 1
    assert several.index("Sort Key") < several.index("Function Scan on unnest")


@pytest.mark.parametrize("backend_url", ["sqlite"], indirect=True)
async def test_a_sqlite_claim_walks_the_index_in_order_with_no_sort(backlogged: SqlStore, backend_url: str) -> None:
    one = await _sqlite_plan(backlogged, backend_url, _claim(["default"]), expect=10)
    several = await _sqlite_plan(backlogged, backend_url, _claim(["default", "emails"]), expect=10)

    assert "ix_conveyor_jobs_runnable" in one
    assert "TEMP B-TREE" not in one
    assert "SCAN" not in one, "the chosen jobs are updated by key"
    # Several queues: each is read in index order up to the limit; only those few rows are sorted.
    assert several.count("ix_conveyor_jobs_runnable") == 2
    assert several.count("TEMP B-TREE") == 1


@pytest.mark.parametrize("backend_url", ["sqlite"], indirect=True)
async def test_an_idle_sqlite_workers_look_for_due_jobs_searches_an_index(
    backlogged: SqlStore, backend_url: str
) -> None:
    plan = await _sqlite_plan(
        backlogged, backend_url, lambda driver: dialects.sqlite_any_due(driver, ["default"], T0_TEXT), expect=True
    )

    assert plan.startswith("SEARCH conveyor_jobs USING INDEX")
    assert "SCAN" not in plan


T0_TEXT = dialects.sqlite_text(T0)


def _claim(queues: list[str]) -> Callable[[Any], Awaitable[Any]]:
    return lambda driver: dialects.sqlite_claim(driver, queues, 10, "w#1", dialects.sqlite_text(T0 + HOUR), T0_TEXT)


class _Recording:
    """The store's SQLite connection, noting each statement it is sent."""

    def __init__(self, driver: Any) -> None:
        self._driver = driver
        self.sent: list[tuple[str, Any]] = []

    async def execute_fetchall(self, statement: str, parameters: Any) -> Any:
        self.sent.append((statement, parameters))
        return await self._driver.execute_fetchall(statement, parameters)


async def _sqlite_plan(store: SqlStore, url: str, send: Callable[[Any], Awaitable[Any]], *, expect: object) -> str:
    """The plan of the one statement ``send`` makes, after checking that it answers ``expect`` (rows: their count)."""
    async with store._engine.connect() as conn:
        recording = _Recording((await conn.get_raw_connection()).driver_connection)
        answer = await send(recording)
    assert (len(answer) if isinstance(answer, list) else answer) == expect
    ((statement, parameters),) = recording.sent
    with sqlite3.connect(url.removeprefix("sqlite:///")) as db:
        return " / ".join(row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {statement}", parameters))


async def _plan(raw: Any, statement: str, queues: str | list[str]) -> str:
    rows = await raw.fetch(f"EXPLAIN {statement}", "w#1", T0, T0, queues, 100)
    return "\n".join(row[0] for row in rows)
