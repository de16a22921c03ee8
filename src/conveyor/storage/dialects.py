"""The only module that knows PostgreSQL from SQLite."""

from __future__ import annotations

import dataclasses
import functools
import json
import operator
import re
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import PoolResetState

from conveyor.errors import ConfigError
from conveyor.jobs import FINISHED_STATES, Ack
from conveyor.settings import Settings

# Filesystems on which SQLite's locking is unreliable, so two processes could both "own" a write.
_NETWORK_FILESYSTEMS = {"nfs", "nfs4", "cifs", "smbfs", "smb3", "9p", "fuse.sshfs", "afs", "ceph", "glusterfs"}

WRITE_OPTION = "conveyor_write"


# orjson handles integers up to 64 bits only: it refuses to write a bigger one, and reads one
# back as a float. A run of 19 digits may be such a number; the standard library keeps it exact.
_LONG_DIGITS = re.compile(r"\d{19}")


def dumps(value: Any) -> str:
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=_json_default)


def _json_default(value: Any) -> Any:
    # What orjson writes natively and the standard library does not: datetimes as ISO text, and
    # dataclass instances as objects of their fields (enums, being str subclasses, need nothing).
    if isinstance(value, datetime):
        return value.isoformat()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: getattr(value, field.name) for field in dataclasses.fields(value)}
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def loads(value: str | bytes) -> Any:
    text = value if isinstance(value, str) else value.decode()
    if _LONG_DIGITS.search(text):
        return json.loads(text)
    return orjson.loads(text)


def sqlite_path(url: sa.URL) -> Path | None:
    return Path(url.database).resolve() if url.database else None


def _filesystem_type(path: Path) -> str | None:
    """The type of the mount holding ``path``, from /proc/mounts (Linux only)."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    best: tuple[int, str] | None = None
    for line in mounts:
        parts = line.split()
        if len(parts) < 3:  # noqa: PLR2004 - device, mount point, type: the fields we read
            continue
        mount_point, fs_type = parts[1], parts[2]
        if path.is_relative_to(mount_point) and (best is None or len(mount_point) > best[0]):
            best = (len(mount_point), fs_type)
    return best[1] if best else None


def create_engine(settings: Settings) -> AsyncEngine:
    url = sa.make_url(settings.database_url)
    if url.get_backend_name() == "sqlite":
        return _create_sqlite_engine(url, settings)
    if "sslmode" in url.query:
        # libpq's spelling, as most PostgreSQL URLs carry it; SQLAlchemy's asyncpg driver wants ``ssl``.
        query = dict(url.query)
        query.setdefault("ssl", query.pop("sslmode"))
        url = url.set(query=query)
    pool_size, max_overflow = engine_pool(settings)
    return create_async_engine(
        url,
        json_serializer=dumps,
        json_deserializer=loads,
        # No pre-ping: it would cost a round trip on every checkout. A connection that died is
        # found by the statement itself, and the store retries that (dialects.is_transient).
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_timeout=settings.pool_timeout_seconds,
        connect_args=postgres_connect_args(settings),
    )


def engine_pool(settings: Settings) -> tuple[int, int]:
    """SQLAlchemy's share of a PostgreSQL process's connections, as (size, overflow): half of each.

    The other half (``driver_pool_size``) is the pool of bare asyncpg connections for the per-job
    statements (``postgres.DriverPool``), so a process holds at most ``pool_size + max_overflow``
    connections over both (at least two).
    """
    return max(1, settings.pool_size // 2), settings.max_overflow // 2


def driver_pool_size(settings: Settings) -> int:
    """The most connections the per-job pool opens: what the engine's share leaves."""
    size, overflow = engine_pool(settings)
    return max(1, settings.pool_size + settings.max_overflow - size - overflow)


def postgres_connect_args(settings: Settings) -> dict[str, Any]:
    """asyncpg's connection options, the same for SQLAlchemy's pool and the driver's own."""
    return {
        "timeout": min(settings.statement_timeout_seconds, 30.0),
        "command_timeout": settings.statement_timeout_seconds,
        # No bitmap scans: on a table whose statistics lag (a bulk enqueue, autovacuum behind or
        # off), the planner takes a few due jobs for granted and reads the runnable index as a
        # bitmap, then sorts every due job to claim a hundred. The claim must walk the index
        # in order and stop at its limit, whatever the statistics say; Conveyor's other
        # queries are key lookups and index ranges that a plain index scan serves as well.
        "server_settings": {"application_name": "conveyor", "enable_bitmapscan": "off"},
    }


def _create_sqlite_engine(url: sa.URL, settings: Settings) -> AsyncEngine:
    path = sqlite_path(url)
    if path is not None:
        if not path.parent.is_dir():
            raise ConfigError(
                "invalid Conveyor settings",
                [f"database_url (CONVEYOR_DATABASE_URL): folder {str(path.parent)!r} does not exist"],
            )
        fs_type = _filesystem_type(path)
        if fs_type in _NETWORK_FILESYSTEMS:
            raise ConfigError(
                "invalid Conveyor settings",
                [
                    (
                        f"database_url (CONVEYOR_DATABASE_URL): {str(path)!r} is on a network filesystem "
                        f"({fs_type}), where SQLite's locks do not hold; use a local disk or PostgreSQL"
                    )
                ],
            )
    busy_timeout = settings.sqlite_busy_timeout_seconds
    engine = create_async_engine(
        url,
        json_serializer=dumps,
        json_deserializer=loads,
        connect_args={"timeout": busy_timeout},
        # Every connection is kept: opening one costs a thread and four PRAGMAs, and a pool that
        # closed its overflow connections on return opened a new one for most requests under load.
        pool_size=settings.pool_size,
        max_overflow=0,
        pool_timeout=settings.pool_timeout_seconds,
        # Replaced by `_on_reset`: a rollback of every connection given back, in a transaction
        # or not, is a call into its thread, about 170 µs of CPU, more than most statements cost.
        pool_reset_on_return=None,
    )

    @event.listens_for(engine.sync_engine, "reset")
    def _on_reset(dbapi_connection: Any, _record: Any, state: PoolResetState) -> None:
        # Connections run in autocommit (below), so SQLite itself says whether one is still
        # inside a transaction (BEGIN is ours); only such a one is rolled back, as before.
        if not state.asyncio_safe:
            return
        if engine.sync_engine.dialect.get_driver_connection(dbapi_connection).in_transaction:
            dbapi_connection.rollback()

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let us issue BEGIN ourselves: the driver's implicit BEGIN is deferred, and a deferred
        # transaction that reads then writes can fail with "database is locked" whatever the
        # busy timeout, because its snapshot is stale, not because it waited too little.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: sa.Connection) -> None:
        write = connection.get_execution_options().get(WRITE_OPTION, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine


def insert_ignoring_duplicates(table: sa.Table, dialect_name: str) -> Any:
    """An INSERT that skips rows whose unique key already exists, leaving them to be looked up."""
    if dialect_name == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing()
    return sqlite.insert(table).on_conflict_do_nothing()


def json_append(column: sa.ColumnElement[Any], entry: sa.BindParameter[Any], dialect_name: str) -> Any:
    """``column`` (a JSON array) with the JSON text in ``entry`` appended, computed in SQL."""
    if dialect_name == "postgresql":
        return column.op("||")(sa.func.jsonb_build_array(sa.cast(entry, postgresql.JSONB)))
    return sa.func.json_insert(column, "$[#]", sa.func.json(entry))


# SQLSTATEs worth another try: lost connections (class 08), a server shutting down or starting
# (57P01-57P03), too many connections, serialization failures and deadlocks, and a read-only
# node after a failover (25006), where a fresh connection finds the new primary.
_TRANSIENT_SQLSTATES = {"57P01", "57P02", "57P03", "53300", "40001", "40P01", "25006"}


def _sqlstate(exc: BaseException) -> str | None:
    for candidate in (exc, getattr(exc, "orig", None), getattr(getattr(exc, "orig", None), "__cause__", None)):
        code = getattr(candidate, "sqlstate", None) or getattr(candidate, "pgcode", None)
        if isinstance(code, str):
            return code
    return None


def is_transient(exc: BaseException) -> bool:
    """Errors worth retrying: the database was busy, restarting, or the connection dropped."""
    original = getattr(exc, "orig", exc)
    if isinstance(original, sqlite3.OperationalError):
        message = str(original).lower()
        return "locked" in message or "busy" in message
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return True
    code = _sqlstate(exc)
    if code is not None and (code.startswith("08") or code in _TRANSIENT_SQLSTATES):
        return True
    cause = getattr(original, "__cause__", None)
    candidates = (exc, original, cause)
    if any(isinstance(item, (ConnectionError, TimeoutError, OSError)) for item in candidates):
        return True
    return any(type(item).__name__ in _DRIVER_CONNECTION_ERRORS for item in candidates)


# The driver's own names for "the connection is gone", matched by name so this module does
# not import the PostgreSQL driver for SQLite users.
_DRIVER_CONNECTION_ERRORS = {
    "ConnectionDoesNotExistError",
    "InternalClientError",
    "CannotConnectNowError",
    "ConnectionFailureError",
    "ClientCannotConnectError",
    "DisconnectionError",
}


async def lock_for_migration(connection: Any) -> None:
    """Make concurrent first starts migrate one at a time (SQLite: BEGIN IMMEDIATE already does)."""
    if connection.dialect.name == "postgresql":
        await connection.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext('conveyor.migrate'))"))


# Acks for PostgreSQL, all in one statement: each row still lands only while its job is running
# under the ack's lease (the fence), exactly as the one-row form does. The batch travels as one
# JSON document, as on SQLite: one orjson call for the whole batch, where nine arrays went through
# the driver's generic array encoder, a dozen type checks per ack. The state is compared under
# COLLATE "C" (``schema.checked_state``) so that each job is found by its key: planned on the state
# index, every ack batch read every running job.
_BULK_ACK_UPDATE = """
    UPDATE conveyor_jobs AS job SET
        state = ack.state,
        result = ack.result,
        error = ack.error,
        run_at = COALESCE(ack.run_at, job.run_at),
        finished_at = ack.finished_at,
        attempt = job.attempt + ack.delta,
        history = job.history || jsonb_build_array(ack.entry),
        lease_owner = NULL,
        lease_expires_at = NULL,
        updated_at = :now
    FROM jsonb_to_recordset(CAST(:batch AS jsonb)) AS ack(
        id text, owner text, state text, result jsonb, error jsonb,
        run_at timestamptz, finished_at timestamptz, delta int, entry jsonb
    )
    WHERE job.id = ack.id AND job.state COLLATE "C" = 'running' AND job.lease_owner = ack.owner
    RETURNING job.id
"""
POSTGRES_BULK_ACK = sa.text(_BULK_ACK_UPDATE)


def postgres_ack_batch(acks: Sequence[Ack], now: datetime) -> str:
    """The acks as one JSON array, for PostgreSQL's ack statements (JSON values nested, times ISO).

    The attempt record and the error go in as they are: the JSON writer turns the dataclasses
    into the objects their ``to_json`` would build (same keys, ISO times), in C. Building those
    dicts in Python took 4.2 of the 6.8 µs a job spent here.
    """
    return dumps(
        [
            {
                "id": ack.job_id,
                "owner": ack.lease_owner,
                "state": ack.state.value,
                "result": ack.result,
                "error": ack.error,
                "run_at": ack.run_at,
                "finished_at": now if ack.state in FINISHED_STATES else None,
                "delta": ack.attempt_delta,
                "entry": ack.record,
            }
            for ack in acks
        ]
    )


# The same acks, all finishing their jobs, with the finished ids announced (200 to a NOTIFY,
# under its payload limit) in the same statement: one autocommit round trip for a whole batch.
POSTGRES_BULK_ACK_AND_NOTIFY = sa.text(
    f"WITH acked AS ({_BULK_ACK_UPDATE}), "  # noqa: S608 - a constant statement, no input in it
    "notified AS (SELECT pg_notify(:channel, string_agg(id, ',')) FROM "
    "(SELECT id, (row_number() OVER ()) / 200 AS chunk FROM acked) AS numbered GROUP BY chunk) "
    "SELECT acked.id FROM acked CROSS JOIN (SELECT count(*) FROM notified) AS sent"
)


# Acks for SQLite, all in one statement: the batch travels as one JSON array that json_each
# unpacks, so a batch costs one call into the database thread, not one per ack. The JSON columns
# arrive as JSON text inside the batch and are stored as that text; the fence is the same. The
# unary + keeps the planner off the state index: the batch is read once, each job found by its key
# (looping over every running job instead, and the batch for each, costs a hundred times more).
SQLITE_BULK_ACK = sa.text("""
    UPDATE conveyor_jobs SET
        state = json_extract(ack.value, '$.state'),
        result = json_extract(ack.value, '$.result'),
        error = json_extract(ack.value, '$.error'),
        run_at = COALESCE(json_extract(ack.value, '$.run_at'), conveyor_jobs.run_at),
        finished_at = json_extract(ack.value, '$.finished_at'),
        attempt = conveyor_jobs.attempt + json_extract(ack.value, '$.delta'),
        history = json_insert(conveyor_jobs.history, '$[#]', json(json_extract(ack.value, '$.entry'))),
        lease_owner = NULL,
        lease_expires_at = NULL,
        updated_at = :now
    FROM json_each(:batch) AS ack
    WHERE conveyor_jobs.id = json_extract(ack.value, '$.id')
        AND +conveyor_jobs.state = 'running'
        AND conveyor_jobs.lease_owner = json_extract(ack.value, '$.owner')
    RETURNING conveyor_jobs.id
""")


def _sqlite_columns() -> tuple[tuple[str, ...], frozenset[str], frozenset[str]]:
    """The jobs table's columns, and which of them hold times and JSON (as the schema types them)."""
    from conveyor.storage.schema import UTCDateTime, jobs  # noqa: PLC0415 - the schema imports this module

    names = tuple(column.name for column in jobs.c)
    times = frozenset(column.name for column in jobs.c if isinstance(column.type, UTCDateTime))
    documents = frozenset(column.name for column in jobs.c if isinstance(column.type, sa.JSON))
    return names, times, documents


_SQLITE_JOB_COLUMNS, _SQLITE_TIME_COLUMNS, _SQLITE_JSON_COLUMNS = _sqlite_columns()


@functools.cache
def _sqlite_claim_sql(queue_count: int) -> str:
    # Each queue has its own scan of the runnable index, in claim order, stopping at the limit
    # (`queue IN (...)` would sort every due job of them all); several queues' few rows are then
    # ordered together. Parameters: lease owner, lease expiry, now (three times), then each queue
    # and its limit, then (several queues) the overall limit.
    per_queue = (
        "SELECT id, priority, run_at FROM conveyor_jobs "
        "WHERE state IN ('queued', 'scheduled', 'retrying') AND run_at <= ?5 AND queue = ? "
        "ORDER BY priority DESC, run_at, id LIMIT ?"
    )
    if queue_count == 1:
        due = f"SELECT id FROM ({per_queue})"  # noqa: S608 - constant
    else:
        arms = " UNION ALL ".join([f"SELECT * FROM ({per_queue})"] * queue_count)  # noqa: S608 - constant
        due = f"SELECT id FROM ({arms}) ORDER BY priority DESC, run_at, id LIMIT ?"  # noqa: S608 - constant
    return (
        "UPDATE conveyor_jobs SET state = 'running', attempt = attempt + 1, lease_owner = ?1, "  # noqa: S608 - constant
        "lease_expires_at = ?2, attempted_at = ?3, updated_at = ?4 "
        f"WHERE id IN ({due}) RETURNING {', '.join(_SQLITE_JOB_COLUMNS)}"
    )


async def sqlite_claim(
    driver: Any, queues: Sequence[str], limit: int, lease_owner: str, lease_expires_at: str, now: str
) -> list[dict[str, Any]]:
    """Lease the best ``limit`` due jobs of ``queues``; their rows, decoded. Times come as SQLite holds them (text).

    One statement, so one transaction on its own, sent in one call into the connection's
    thread: an UPDATE takes the write lock as it starts, so it waits its turn like ``BEGIN
    IMMEDIATE``. Inside SQLAlchemy's transaction the claim took five such calls.
    """
    per_queue = tuple(value for queue in queues for value in (queue, limit))
    overall = (limit,) if len(queues) > 1 else ()
    parameters = (lease_owner, lease_expires_at, now, now, now, *per_queue, *overall)
    found = await driver.execute_fetchall(_sqlite_claim_sql(len(queues)), parameters)
    return [sqlite_job_row(row) for row in found]


@functools.cache
def _sqlite_any_due_sql(queue_count: int) -> str:
    # The runnable states written out, as the partial index's predicate names them.
    return (
        "SELECT 1 FROM conveyor_jobs WHERE state IN ('queued', 'scheduled', 'retrying') "  # noqa: S608 - constant
        f"AND run_at <= ? AND queue IN ({', '.join('?' * queue_count)}) LIMIT 1"
    )


async def sqlite_any_due(driver: Any, queues: Sequence[str], now: str) -> bool:
    """Whether any job of ``queues`` is due at ``now`` (SQLite's text time): one read, one call into the thread."""
    return bool(await driver.execute_fetchall(_sqlite_any_due_sql(len(queues)), (now, *queues)))


# The ids travel as one JSON array: one statement, cached once, however many are asked about.
_SQLITE_GET_JOBS = (
    f"SELECT {', '.join(_SQLITE_JOB_COLUMNS)} FROM conveyor_jobs "  # noqa: S608 - constant
    "WHERE id IN (SELECT value FROM json_each(?))"
)


async def sqlite_get_jobs(driver: Any, job_ids: Sequence[str]) -> list[dict[str, Any]]:
    """The rows of the jobs that exist among ``job_ids``, decoded, read in one call into the connection's thread.

    Through SQLAlchemy's cursor, a read makes about fifteen calls (begin, execute, fetch,
    close, rollback), each a hop to the database's thread and back: 2 ms against 0.6.
    """
    found = await driver.execute_fetchall(_SQLITE_GET_JOBS, (dumps(list(job_ids)),))
    return [sqlite_job_row(row) for row in found]


@functools.cache
def _sqlite_insert_sql(columns: tuple[str, ...]) -> str:
    # `WHERE true` tells SQLite's parser that ON CONFLICT belongs to the INSERT, not to a join.
    values = ", ".join(f"json_extract(value, '$[{position}]')" for position in range(len(columns)))
    return (
        f"INSERT INTO conveyor_jobs ({', '.join(columns)}) "  # noqa: S608 - the table's own column names
        f"SELECT {values} FROM json_each(?) WHERE true ON CONFLICT DO NOTHING"
    )


def sqlite_text(value: datetime) -> str:
    """A time as SQLite columns hold it (SQLAlchemy's DATETIME text, in UTC), for hand-written SQL."""
    # isoformat, not strftime: the same text in a fraction of the time (an enqueue writes three).
    utc = value if value.tzinfo is UTC else value.astimezone(UTC)
    return utc.replace(tzinfo=None).isoformat(" ", "microseconds")


@functools.cache
def _sqlite_storage(columns: tuple[str, ...]) -> tuple[Callable[[Mapping[str, Any]], tuple[Any, ...]], tuple[str, ...]]:
    """For rows with these columns: what picks their values in order, and each column's kind."""
    kinds = tuple(
        "time" if name in _SQLITE_TIME_COLUMNS else "json" if name in _SQLITE_JSON_COLUMNS else "plain"
        for name in columns
    )
    return operator.itemgetter(*columns), kinds


async def sqlite_insert_rows(driver: Any, rows: Sequence[Mapping[str, Any]]) -> None:
    """Insert job rows that hold no idempotency or unique key: one statement, one call into the thread.

    The rows travel as one JSON array of arrays, unpacked by ``json_each``; a row whose id is
    stored already (a retried batch) is skipped. One statement is one transaction, and an
    INSERT asks for the write lock as it starts, so it waits its turn like ``BEGIN IMMEDIATE``.
    Through SQLAlchemy the same insert took about fifteen calls into the thread, and its
    per-row parameter processing cost the event loop more than the insert costs SQLite.
    """
    columns = tuple(rows[0])
    pick, kinds = _sqlite_storage(columns)
    # Jobs enqueued together mostly share their times (created, updated, due): each is written once.
    texts: dict[datetime, str] = {}
    document = []
    for row in rows:
        stored = []
        for kind, value in zip(kinds, pick(row), strict=True):
            if value is None or kind == "plain":
                stored.append(value)
            elif kind == "time":
                text = texts.get(value)
                if text is None:
                    text = texts[value] = sqlite_text(value)
                stored.append(text)
            else:
                stored.append(dumps(value))
        document.append(stored)
    await driver.execute(_sqlite_insert_sql(columns), (dumps(document),))


def sqlite_job_row(row: Sequence[Any]) -> dict[str, Any]:
    """A job row as SQLite returns it (times and JSON as text), decoded as the column types would."""
    decoded = dict(zip(_SQLITE_JOB_COLUMNS, row, strict=True))
    for name in _SQLITE_TIME_COLUMNS:
        value = decoded[name]
        if value is not None:
            decoded[name] = datetime.fromisoformat(value).replace(tzinfo=UTC)
    for name in _SQLITE_JSON_COLUMNS:
        value = decoded[name]
        if value is not None:
            decoded[name] = loads(value)
    return decoded
