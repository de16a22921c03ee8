"""Schema migrations through Alembic, run in-process on the store's own engine."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncEngine
from tenacity import AsyncRetrying, retry_if_exception, stop_after_delay, wait_random_exponential

from conveyor.errors import SchemaError, StorageError
from conveyor.storage import dialects
from conveyor.storage.schema import VERSION_TABLE


def alembic_config(connection: sa.Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", "conveyor:migrations")
    config.attributes["connection"] = connection
    return config


def _script() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> str:
    head = _script().get_current_head()
    if head is None:  # pragma: no cover - the package always ships its revisions
        raise SchemaError("no migrations found in the conveyor package")
    return head


def _current_revision(connection: sa.Connection) -> str | None:
    context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    return context.get_current_revision()


def _is_known(revision: str) -> bool:
    try:
        return _script().get_revision(revision) is not None
    except Exception:  # noqa: BLE001 - alembic raises several types for "no such revision"
        return False


def _newer_schema_error(revision: str) -> SchemaError:
    return SchemaError(
        f"the database schema is at revision {revision!r}, which this version of Conveyor does not "
        f"know (its newest is {head_revision()!r}): a newer Conveyor migrated it. Upgrade Conveyor "
        "on this machine, or point CONVEYOR_DATABASE_URL at another database."
    )


@dataclass(frozen=True, slots=True)
class SchemaStatus:
    current: str | None
    head: str

    @property
    def up_to_date(self) -> bool:
        return self.current == self.head


async def status(engine: AsyncEngine) -> SchemaStatus:
    try:
        # A process opening SQLite while another writes can find it busy for a moment (a "database
        # is locked" that the busy timeout does not cover): a short retry, as for any transient error.
        async for attempt in AsyncRetrying(
            retry=retry_if_exception(dialects.is_transient),
            stop=stop_after_delay(5),
            wait=wait_random_exponential(multiplier=0.02, max=0.5),
            reraise=True,
        ):
            with attempt:
                async with engine.connect() as conn:
                    current = await conn.run_sync(_current_revision)
                return SchemaStatus(current=current, head=head_revision())
    except (sa_exc.SQLAlchemyError, sqlite3.Error, OSError) as exc:
        raise StorageError(f"cannot read the schema revision: {exc}") from exc
    raise AssertionError("unreachable: tenacity either returns or re-raises")  # pragma: no cover


async def _migrate(engine: AsyncEngine, work: Any) -> Any:
    write_engine = engine.execution_options(**{dialects.WRITE_OPTION: True})
    try:
        async with write_engine.begin() as conn:
            await dialects.lock_for_migration(conn)
            return await conn.run_sync(work)
    except SchemaError:
        raise
    except (sa_exc.SQLAlchemyError, sqlite3.Error, OSError) as exc:
        raise StorageError(f"migration failed: {exc}") from exc


async def upgrade(engine: AsyncEngine, revision: str = "head") -> SchemaStatus:
    """Upgrade under a lock, so processes starting together migrate once."""

    def work(connection: sa.Connection) -> None:
        current = _current_revision(connection)
        if current is not None and not _is_known(current):
            raise _newer_schema_error(current)
        command.upgrade(alembic_config(connection), revision)

    await _migrate(engine, work)
    return await status(engine)


async def downgrade(engine: AsyncEngine, revision: str) -> SchemaStatus:
    await _migrate(engine, lambda connection: command.downgrade(alembic_config(connection), revision))
    return await status(engine)


async def ensure_current(engine: AsyncEngine, *, auto_migrate: bool) -> None:
    """Refuse a schema this Conveyor cannot use; bring an older one up to date if allowed."""
    found = await status(engine)
    if found.up_to_date:
        return
    if found.current is not None and not _is_known(found.current):
        raise _newer_schema_error(found.current)
    if not auto_migrate:
        where = f"at revision {found.current!r}" if found.current else "not created"
        raise SchemaError(
            f"the database schema is {where}; this Conveyor needs {found.head!r}. Run `conveyor db upgrade`."
        )
    await upgrade(engine)
