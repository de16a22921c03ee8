"""Statements that find jobs by id use the primary key, however many jobs are running.

Statistics gathered in a quiet moment say almost no job runs, so a planner is tempted to find
`id = ... AND state = 'running'` through an index on state, and then reads every running job
for each one it looks up: an ack batch or a heartbeat would cost as much as the whole fleet's
running jobs. Results stay correct, so only the plan shows it.

PostgreSQL's plans are read with sequential scans switched off: the table here is small enough
for a scan of it to be the cheapest plan, which it never is at a size where this matters. What
is checked is that no index on state can serve the lookup.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import event

from conveyor.jobs import Ack, AttemptRecord, Job, JobFilter, JobState, NewJob, Outcome
from conveyor.limits import ClaimLimits
from conveyor.settings import Settings
from conveyor.storage import dialects, open_store
from conveyor.storage import postgres as pg
from conveyor.storage.sql import SqlStore

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
JOBS = 2_000
RUNNING = 500
STATE_INDEXES = ("ix_conveyor_jobs_set_aside", "ix_conveyor_jobs_leases", "ix_conveyor_jobs_runnable")


@pytest.fixture
async def running(backend_url: str) -> AsyncIterator[tuple[SqlStore, list[Job]]]:
    """A store of JOBS jobs whose statistics were taken before any ran, and RUNNING of them running now."""
    store = await open_store(Settings(database_url=backend_url))
    assert isinstance(store, SqlStore)
    await store.insert_jobs([NewJob(task="t", args=[], kwargs={}) for _ in range(JOBS)], now=T0)
    async with store._engine.begin() as conn:
        await conn.exec_driver_sql("ANALYZE")
    claimed = await store.fetch_jobs(queues=["default"], limit=RUNNING, lease_owner="w#1", lease_seconds=60, now=T0)
    assert len(claimed) == RUNNING
    yield store, claimed
    await store.close()


def _operations(store: SqlStore, claimed: list[Job]) -> dict[str, Callable[[], Awaitable[Any]]]:
    mine = claimed[:5]
    return {
        "heartbeat": lambda: store.heartbeat_jobs({job.id: "w#1" for job in mine}, lease_seconds=60, now=T0),
        "progress": lambda: store.record_progress({mine[0].id: ("w#1", {"fraction": 0.5})}, now=T0),
        "cancel check": lambda: store.cancel_requested_among([job.id for job in mine]),
        "cancel": lambda: store.cancel_job(mine[1].id, now=T0),
    }


@pytest.mark.parametrize("backend_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)
async def test_postgres_lookups_by_id_of_running_jobs_use_the_primary_key(
    running: tuple[SqlStore, list[Job]],
) -> None:
    store, claimed = running
    plans = {name: await _postgres_plan(store, operation) for name, operation in _operations(store, claimed).items()}
    acks = [_ack(job) for job in claimed[:5]]
    batch = dialects.postgres_ack_batch(acks, T0)
    plans["ack batch"] = await _explain(store, pg._ACK_SQL, (T0, pg.FINISHED_CHANNEL, batch))
    alone = (T0, pg.FINISHED_CHANNEL, claimed[0].id, "succeeded", None, None, None, 0, "{}", "w#1")
    plans["ack alone"] = await _explain(store, pg._SINGLE_ACK_SQL, alone)
    plans["reads of jobs"] = await _explain(store, pg._GET_SQL, ([job.id for job in claimed[:5]],))

    for name, plan in plans.items():
        assert "pk_conveyor_jobs" in plan, f"{name}:\n{plan}"
        assert not any(index in plan for index in STATE_INDEXES), f"{name}:\n{plan}"


@pytest.mark.parametrize("backend_url", ["sqlite"], indirect=True)
async def test_sqlite_lookups_by_id_of_running_jobs_use_the_primary_key(
    running: tuple[SqlStore, list[Job]], backend_url: str
) -> None:
    store, claimed = running
    operations = {**_operations(store, claimed), "ack batch": lambda: store.ack_jobs([_ack(claimed[2])], now=T0)}
    plans = {name: await _sqlite_plan(store, backend_url, operation) for name, operation in operations.items()}
    # Reads of jobs go to the driver, not through SQLAlchemy: their statement is explained as it is.
    reads = (dialects._SQLITE_GET_JOBS, (json.dumps([job.id for job in claimed[:5]]),))
    plans["reads of jobs"] = _sqlite_explained(backend_url, *reads)
    for name, plan in plans.items():
        assert "sqlite_autoindex_conveyor_jobs_1" in plan, f"{name}: {plan}"
        assert not any(index in plan for index in STATE_INDEXES), f"{name}: {plan}"


async def _dead_letters(store: SqlStore, claimed: list[Job]) -> Callable[[], Awaitable[Any]]:
    """Three of the running jobs dead; the listing of the dead-letter queue, to be explained."""
    await store.ack_jobs([_ack(job, JobState.DEAD) for job in claimed[:3]], now=T0)
    dead = await store.list_jobs(JobFilter(states=(JobState.DEAD,)))
    assert {job.id for job in dead.jobs} == {job.id for job in claimed[:3]}
    return lambda: store.list_jobs(JobFilter(states=(JobState.DEAD,)))


# No index of every job's state exists (each change of state would write to it): a listing of
# the jobs set aside reads the partial index of those, newest first, without sorting them.
@pytest.mark.parametrize("backend_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)
async def test_postgres_dead_letter_listing_reads_the_set_aside_index_in_order(
    running: tuple[SqlStore, list[Job]],
) -> None:
    store, claimed = running
    plan = await _postgres_plan(store, await _dead_letters(store, claimed))
    assert "Index Scan Backward using ix_conveyor_jobs_set_aside" in plan, plan
    assert "Sort" not in plan, plan


@pytest.mark.parametrize("backend_url", ["sqlite"], indirect=True)
async def test_sqlite_dead_letter_listing_reads_the_set_aside_index_in_order(
    running: tuple[SqlStore, list[Job]], backend_url: str
) -> None:
    store, claimed = running
    plan = await _sqlite_plan(store, backend_url, await _dead_letters(store, claimed))
    assert "USING INDEX ix_conveyor_jobs_set_aside" in plan, plan
    assert "TEMP B-TREE" not in plan, plan


def _lease_readers(store: SqlStore) -> dict[str, tuple[Callable[[], Awaitable[Any]], str]]:
    """What reads running jobs by state: the rescue of expired leases, a full queue's count of them."""
    limits = ClaimLimits(queues={"default": 1})

    def claim() -> Awaitable[Any]:
        return store.fetch_jobs(queues=["default"], limit=1, lease_owner="w#2", lease_seconds=60, now=T0, limits=limits)

    return {"rescue": (lambda: store.rescue_jobs(now=T0), "lease_expires_at <"), "queue room": (claim, "count(")}


# With no index of every job's state, the reads of running jobs by state must take the index of
# leases (whose predicate is the running state) rather than read the whole table.
@pytest.mark.parametrize("backend_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)
async def test_postgres_reads_of_running_jobs_by_state_use_the_lease_index(
    running: tuple[SqlStore, list[Job]],
) -> None:
    store, _ = running
    for name, (operation, marker) in _lease_readers(store).items():
        plan = await _explain(store, *await _captured(store, operation, marker))
        assert "ix_conveyor_jobs_leases" in plan, f"{name}:\n{plan}"


@pytest.mark.parametrize("backend_url", ["sqlite"], indirect=True)
async def test_sqlite_reads_of_running_jobs_by_state_use_the_lease_index(
    running: tuple[SqlStore, list[Job]], backend_url: str
) -> None:
    store, _ = running
    for name, (operation, marker) in _lease_readers(store).items():
        plan = _sqlite_explained(backend_url, *await _captured(store, operation, marker))
        assert "USING INDEX ix_conveyor_jobs_leases" in plan, f"{name}: {plan}"


def _ack(job: Job, state: JobState = JobState.SUCCEEDED) -> Ack:
    outcome = Outcome.SUCCEEDED if state is JobState.SUCCEEDED else Outcome.FAILED
    record = AttemptRecord(attempt=1, worker="w", started_at=T0, ended_at=T0, outcome=outcome)
    return Ack(job_id=job.id, lease_owner="w#1", state=state, record=record)


async def _captured(store: SqlStore, operation: Callable[[], Awaitable[Any]], marker: str = "id") -> tuple[str, Any]:
    """The operation's first statement on the jobs table that has ``marker`` in it, with its parameters."""
    statements: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, executemany: bool) -> None:
        if "conveyor_jobs" in statement and marker in statement:
            statements.append((statement, parameters[0] if executemany else parameters))

    engine = store._engine.sync_engine
    event.listen(engine, "before_cursor_execute", capture)
    try:
        await operation()
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    assert statements, "the operation ran no statement on the jobs table"
    return statements[0]


async def _postgres_plan(store: SqlStore, operation: Callable[[], Awaitable[Any]]) -> str:
    statement, parameters = await _captured(store, operation)
    return await _explain(store, statement, parameters)


async def _explain(store: SqlStore, statement: str, parameters: Any) -> str:
    async with store._read_engine.connect() as conn:
        raw = (await conn.get_raw_connection()).driver_connection
        assert raw is not None
        async with raw.transaction():
            await raw.execute("SET LOCAL enable_seqscan = off")
            rows = await raw.fetch(f"EXPLAIN {statement}", *parameters)
    return "\n".join(row[0] for row in rows)


async def _sqlite_plan(store: SqlStore, url: str, operation: Callable[[], Awaitable[Any]]) -> str:
    return _sqlite_explained(url, *await _captured(store, operation))


def _sqlite_explained(url: str, statement: str, parameters: Any) -> str:
    with sqlite3.connect(url.removeprefix("sqlite:///")) as db:
        return " / ".join(row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {statement}", parameters))
