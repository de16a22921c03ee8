"""The storage boundary: the one protocol the worker, the API and the CLI talk to."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol

from conveyor.jobs import Ack, Job, JobFilter, NewJob, Page, QueueStats, TokenRecord
from conveyor.limits import ClaimLimits
from conveyor.settings import Settings
from conveyor.workflows import CompiledWorkflow, Workflow


class Store(Protocol):
    """Durable job storage. Every method that decides by time takes ``now``: time is injected."""

    dialect: str

    async def insert_jobs(self, new_jobs: Sequence[NewJob], *, now: datetime, connection: Any = None) -> list[Job]: ...

    async def insert_workflow(
        self, compiled: CompiledWorkflow, *, name: str | None, now: datetime, connection: Any = None
    ) -> Workflow: ...

    async def get_workflow(self, workflow_id: str) -> Workflow | None: ...

    async def wait_for_jobs(self, timeout: float) -> None: ...

    def wake_waiters(self) -> None: ...

    def stop_listening(self) -> None: ...

    async def fetch_jobs(
        self,
        *,
        queues: Sequence[str],
        limit: int,
        lease_owner: str,
        lease_seconds: float,
        now: datetime,
        limits: ClaimLimits | None = None,
    ) -> list[Job]: ...

    async def heartbeat_jobs(self, leases: Mapping[str, str], *, lease_seconds: float, now: datetime) -> set[str]: ...

    async def ack_jobs(self, acks: Sequence[Ack], *, now: datetime) -> set[str]: ...

    async def rescue_jobs(self, *, now: datetime, limit: int = 1_000) -> list[Job]: ...

    async def prune_jobs(self, *, finished_before: datetime, batch_size: int = 500) -> int: ...

    async def get_job(self, job_id: str) -> Job | None: ...

    async def find_idempotency_keys(self, keys: Sequence[str]) -> dict[str, str]: ...

    async def last_idempotency_key(self, prefix: str, *, length: int) -> str | None: ...

    async def list_jobs(self, job_filter: JobFilter, *, cursor: str | None = None, limit: int = 50) -> Page: ...

    async def queue_stats(self) -> list[QueueStats]: ...

    async def cancel_job(self, job_id: str, *, now: datetime) -> Job: ...

    async def retry_job(self, job_id: str, *, now: datetime) -> Job: ...

    async def cancel_requested_among(self, job_ids: Sequence[str]) -> set[str]: ...

    async def record_progress(self, reports: Mapping[str, tuple[str, dict[str, Any]]], *, now: datetime) -> None: ...

    def on_jobs_finished(self, listener: Callable[[set[str]], None]) -> None: ...

    def on_commits(self, listener: Callable[[], None]) -> None: ...

    async def schema_revision(self) -> str | None: ...

    async def finished_among(self, job_ids: Sequence[str]) -> set[str]: ...

    async def insert_token(self, token: TokenRecord) -> None: ...

    async def get_token(self, token_id: str) -> TokenRecord | None: ...

    async def list_tokens(self) -> list[TokenRecord]: ...

    async def count_tokens(self) -> int: ...

    async def revoke_token(self, token_id: str, *, now: datetime) -> bool: ...

    async def close(self) -> None: ...


async def open_store(settings: Settings) -> Store:
    """Connect, check the schema (migrating it first where settings allow), and return the store."""
    from conveyor.storage import dialects  # noqa: PLC0415 - keeps `import conveyor` light
    from conveyor.storage.sql import SqlStore  # noqa: PLC0415

    engine = dialects.create_engine(settings)
    try:
        if not await _schema_is_current(engine):
            from conveyor.storage import migrate  # noqa: PLC0415 - Alembic, only when the schema needs it

            await migrate.ensure_current(engine, auto_migrate=settings.should_auto_migrate)
    except BaseException:
        await engine.dispose()
        raise
    if engine.dialect.name != "postgresql":
        return SqlStore(engine)
    from conveyor.storage import postgres  # noqa: PLC0415 - PostgreSQL users only

    driver = postgres.DriverPool(
        postgres.asyncpg_dsn(engine.url),
        max_size=dialects.driver_pool_size(settings),
        acquire_timeout=settings.pool_timeout_seconds,
        connect_args=dialects.postgres_connect_args(settings),
    )
    try:
        # Now rather than on first use, where the first enqueue or claim waited about 4 ms for it.
        await driver.open()
    except BaseException:
        await engine.dispose()
        raise
    return SqlStore(engine, driver)


async def _schema_is_current(engine: Any) -> bool:
    """Whether the database is at this Conveyor's schema revision, read in one query without Alembic.

    Anything else (no version table yet, another revision, an error reading it) is for
    ``migrate.ensure_current`` to judge, with its retries and its messages.
    """
    import sqlite3  # noqa: PLC0415 - keeps `import conveyor` light

    import sqlalchemy as sa  # noqa: PLC0415
    from sqlalchemy import exc as sa_exc  # noqa: PLC0415

    from conveyor.storage.schema import SCHEMA_REVISION, VERSION_TABLE  # noqa: PLC0415

    query = sa.text(f"SELECT version_num FROM {VERSION_TABLE}")  # noqa: S608 - a constant name
    try:
        async with engine.connect() as conn:
            found = (await conn.execute(query)).scalars().all()
    except (sa_exc.SQLAlchemyError, sqlite3.Error, OSError):
        return False
    return found == [SCHEMA_REVISION]
