"""Schema migrations on a real SQLite file: they build what schema.py declares, and guard the schema."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.ext.asyncio import AsyncEngine
from tests.support import postgres

from conveyor.errors import SchemaError
from conveyor.jobs import NewJob
from conveyor.settings import Settings
from conveyor.storage import dialects, migrate, open_store
from conveyor.storage.schema import SCHEMA_REVISION, metadata

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(database_url=f"sqlite:///{tmp_path / 'migrations.db'}")


@pytest.fixture
async def engine(settings: Settings) -> AsyncIterator[AsyncEngine]:
    created = dialects.create_engine(settings)
    yield created
    await created.dispose()


async def table_names(engine: AsyncEngine) -> set[str]:
    async with engine.connect() as conn:
        return set(await conn.run_sync(lambda sync: sa.inspect(sync).get_table_names()))


async def version_rows(engine: AsyncEngine) -> list[str]:
    async with engine.connect() as conn:
        return list((await conn.execute(sa.text(f"SELECT version_num FROM {migrate.VERSION_TABLE}"))).scalars())


def _schema_differences(connection: sa.Connection) -> list[Any]:
    context = MigrationContext.configure(
        connection,
        opts={"version_table": migrate.VERSION_TABLE, "compare_type": True, "target_metadata": metadata},
    )
    return list(compare_metadata(context, metadata))


async def test_upgrade_from_empty_creates_the_schema_and_reports_up_to_date(engine: AsyncEngine) -> None:
    before = await migrate.status(engine)
    assert before.current is None
    assert not before.up_to_date

    after = await migrate.upgrade(engine)

    assert after.up_to_date
    assert after.current == migrate.head_revision()
    assert (await migrate.status(engine)).up_to_date
    assert {"conveyor_jobs", migrate.VERSION_TABLE} <= await table_names(engine)


async def test_migrated_schema_matches_the_declared_metadata(engine: AsyncEngine) -> None:
    await migrate.upgrade(engine)

    async with engine.connect() as conn:
        differences = await conn.run_sync(_schema_differences)

    assert differences == []


@pytest.mark.postgres
@pytest.mark.usefixtures("postgres_database")  # the server is reachable, or the test is skipped
async def test_migrated_postgres_schema_matches_the_declared_metadata() -> None:
    """A database of its own: the run's shared one also holds other tests' tables."""
    name = await postgres.create_database("conveyor_migrations")
    created = dialects.create_engine(Settings(database_url=postgres.database_url(name)))
    try:
        await migrate.upgrade(created)
        async with created.connect() as conn:
            differences = await conn.run_sync(_schema_differences)
    finally:
        await created.dispose()
        await postgres.drop_database(name)

    assert differences == []


@pytest.mark.postgres
@pytest.mark.usefixtures("postgres_database")
async def test_migrated_postgres_indexes_equal_the_declared_ones_predicates_included() -> None:
    """Alembic's comparison above does not look at a partial index's predicate: this does."""
    migrated = await postgres.create_database("conveyor_migrated")
    declared = await postgres.create_database("conveyor_declared")
    try:
        migrated_engine = dialects.create_engine(Settings(database_url=postgres.database_url(migrated)))
        declared_engine = dialects.create_engine(Settings(database_url=postgres.database_url(declared)))
        try:
            await migrate.upgrade(migrated_engine)
            async with declared_engine.begin() as conn:
                await conn.run_sync(metadata.create_all)
            by_migrations = await _postgres_index_definitions(migrated_engine)
            by_schema = await _postgres_index_definitions(declared_engine)
        finally:
            await migrated_engine.dispose()
            await declared_engine.dispose()
    finally:
        await postgres.drop_database(migrated)
        await postgres.drop_database(declared)

    assert "WHERE" in by_schema["ix_conveyor_jobs_runnable"]
    assert by_migrations == by_schema


async def _postgres_index_definitions(engine: AsyncEngine) -> dict[str, str]:
    query = sa.text(
        "SELECT indexname, indexdef FROM pg_indexes WHERE tablename LIKE 'conveyor%' AND tablename <> :versions"
    )
    async with engine.connect() as conn:
        return dict((await conn.execute(query, {"versions": migrate.VERSION_TABLE})).all())


async def test_compare_would_notice_a_schema_that_drifted(engine: AsyncEngine) -> None:
    # The comparison above is only worth something if it can see a difference.
    await migrate.upgrade(engine)
    async with engine.begin() as conn:
        await conn.execute(sa.text("ALTER TABLE conveyor_jobs ADD COLUMN stray INTEGER"))
        await conn.execute(sa.text("DROP INDEX ix_conveyor_jobs_workflow_id"))

    async with engine.connect() as conn:
        differences = await conn.run_sync(_schema_differences)

    kinds = sorted(str(diff[0]) for diff in differences if isinstance(diff, tuple))
    assert kinds == ["add_index", "remove_column"]


async def test_downgrade_to_base_then_upgrade_round_trips(engine: AsyncEngine, settings: Settings) -> None:
    await migrate.upgrade(engine)

    down = await migrate.downgrade(engine, "base")

    assert down.current is None
    assert "conveyor_jobs" not in await table_names(engine)

    up = await migrate.upgrade(engine)

    assert up.up_to_date
    async with engine.connect() as conn:
        assert await conn.run_sync(_schema_differences) == []
    store = await open_store(settings)
    try:
        assert len(await store.insert_jobs([NewJob(task="t", args=[], kwargs={})], now=T0)) == 1
    finally:
        await store.close()


async def test_open_store_refuses_a_schema_from_a_newer_conveyor(engine: AsyncEngine, settings: Settings) -> None:
    await migrate.upgrade(engine)
    async with engine.begin() as conn:
        await conn.execute(sa.text(f"UPDATE {migrate.VERSION_TABLE} SET version_num = '9999'"))

    with pytest.raises(SchemaError) as caught:
        await open_store(settings)

    message = str(caught.value)
    assert "'9999'" in message
    assert "newer" in message
    # Refused, not "repaired": the revision is left as the newer Conveyor wrote it.
    assert await version_rows(engine) == ["9999"]


async def test_upgrade_refuses_a_schema_from_a_newer_conveyor(engine: AsyncEngine) -> None:
    await migrate.upgrade(engine)
    async with engine.begin() as conn:
        await conn.execute(sa.text(f"UPDATE {migrate.VERSION_TABLE} SET version_num = '9999'"))

    with pytest.raises(SchemaError, match="newer"):
        await migrate.upgrade(engine)

    assert await version_rows(engine) == ["9999"]


async def test_open_store_without_auto_migrate_refuses_an_empty_database(tmp_path: Path) -> None:
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'empty.db'}", auto_migrate=False)

    with pytest.raises(SchemaError) as caught:
        await open_store(settings)

    assert "conveyor db upgrade" in str(caught.value)
    assert "not created" in str(caught.value)
    engine = dialects.create_engine(settings)
    try:
        assert "conveyor_jobs" not in await table_names(engine)
    finally:
        await engine.dispose()


async def test_open_store_without_auto_migrate_accepts_a_current_schema(
    engine: AsyncEngine, settings: Settings
) -> None:
    await migrate.upgrade(engine)

    store = await open_store(settings.model_copy(update={"auto_migrate": False}))

    await store.close()


async def test_two_stores_opening_a_fresh_database_together_migrate_it_once(settings: Settings) -> None:
    first, second = await asyncio.gather(open_store(settings), open_store(settings))
    try:
        engine = dialects.create_engine(settings)
        try:
            assert (await migrate.status(engine)).up_to_date
            assert await version_rows(engine) == [migrate.head_revision()]
            async with engine.connect() as conn:
                assert await conn.run_sync(_schema_differences) == []
        finally:
            await engine.dispose()
        # Both are usable stores on the one schema.
        (job,) = await first.insert_jobs([NewJob(task="t", args=[], kwargs={})], now=T0)
        assert await second.get_job(job.id) == job
    finally:
        await first.close()
        await second.close()


def test_the_schema_revision_that_start_up_checks_is_alembics_head() -> None:
    assert migrate.head_revision() == SCHEMA_REVISION, "a new migration moves schema.SCHEMA_REVISION too"


_OPEN_AND_REPORT = """
import asyncio, sys
from conveyor.settings import Settings
from conveyor.storage import open_store

async def main():
    store = await open_store(Settings(database_url=sys.argv[1]))
    await store.close()
    print("alembic loaded" if "alembic" in sys.modules else "alembic not loaded")

asyncio.run(main())
"""


def _open_in_a_new_process(settings: Settings) -> str:
    done = subprocess.run(
        [sys.executable, "-c", _OPEN_AND_REPORT, settings.database_url],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


async def test_a_process_opening_a_current_schema_never_loads_alembic(engine: AsyncEngine, settings: Settings) -> None:
    await migrate.upgrade(engine)

    assert await asyncio.to_thread(_open_in_a_new_process, settings) == "alembic not loaded"


async def test_a_process_opening_an_older_schema_still_migrates_it(engine: AsyncEngine, settings: Settings) -> None:
    await migrate.upgrade(engine)
    older = (await migrate.downgrade(engine, "-1")).current
    assert older != SCHEMA_REVISION

    assert await asyncio.to_thread(_open_in_a_new_process, settings) == "alembic loaded"

    assert await version_rows(engine) == [SCHEMA_REVISION]
