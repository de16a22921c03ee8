"""PostgreSQL's own runtime pieces: the LISTEN connection, and the per-job statements on their own connections.

``dialects.py`` holds the SQL that differs between databases; this module holds what only
PostgreSQL has at all.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import operator
import random
import re
import time
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

import asyncpg
import sqlalchemy as sa
import structlog

from conveyor.background import Background
from conveyor.jobs import Ack, AttemptRecord, Job, JobError, JobState, fast_constructor
from conveyor.storage.dialects import POSTGRES_BULK_ACK_AND_NOTIFY, dumps, loads, postgres_ack_batch

logger = structlog.get_logger("conveyor.storage")

JOBS_CHANNEL = "conveyor_jobs"
"""Payload: a queue name that has new runnable jobs."""
FINISHED_CHANNEL = "conveyor_finished"
"""Payload: comma-separated ids of jobs that finished."""
NOTIFY_PAYLOAD_LIMIT = 7_900
"""PostgreSQL refuses payloads of 8,000 bytes or more; ids are chunked below that."""
_ERROR_LOG_INTERVAL = 10.0
LISTENER_APPLICATION_NAME = "conveyor-listener"
"""How the LISTEN connection shows in pg_stat_activity."""


def asyncpg_dsn(url: sa.URL) -> str:
    """A libpq-style DSN for asyncpg itself, which spells the TLS option ``sslmode``."""
    query = dict(url.query)
    if "ssl" in query and "sslmode" not in query:
        query["sslmode"] = query.pop("ssl")
    return url.set(drivername="postgresql", query=query).render_as_string(hide_password=False)


def chunk_ids(job_ids: Sequence[str]) -> list[str]:
    """Join ids into comma-separated payloads, each under the NOTIFY size limit."""
    chunks: list[str] = []
    current: list[str] = []
    size = 0
    for job_id in job_ids:
        if current and size + len(job_id) + 1 > NOTIFY_PAYLOAD_LIMIT:
            chunks.append(",".join(current))
            current, size = [], 0
        current.append(job_id)
        size += len(job_id) + 1
    if current:
        chunks.append(",".join(current))
    return chunks


class Listener:
    """One LISTEN connection per store, kept alive: health-checked, and re-opened when it drops.

    A dead listener would quietly turn instant wake-ups into slow polling, so it is checked
    every ``check_interval`` seconds and rebuilt with jittered backoff; every (re)connect also
    fires ``on_connect``, so whatever was notified during the gap is looked for at once, and so
    does each channel taken up on a live connection (``add``). A channel given up (``remove``)
    no longer wakes the connection or its server backend.
    """

    def __init__(self, dsn: str, *, on_connect: Callable[[], None], check_interval: float = 5.0) -> None:
        self._dsn = dsn
        # Channels and their handlers, as added: each connection listens on all of them.
        self._handlers: dict[str, Callable[[str], None]] = {}
        self._on_connect = on_connect
        self._check_interval = check_interval
        self._background = Background(self._run, name="conveyor-pg-listener")
        self.connected = asyncio.Event()
        self.listening: set[str] = set()
        """The channels the current connection listens on (none while it is down)."""
        self._callbacks: dict[str, Callable[..., None]] = {}
        self._changed = asyncio.Event()
        self._last_error_log = 0.0

    def start(self) -> None:
        self._background.start()

    def add(self, channel: str, handler: Callable[[str], None]) -> None:
        """Listen on ``channel`` too, from the next moment the connection can take it (once per channel).

        Each channel a connection listens on wakes it, and the server's backend serving it, for
        every notification on it: a process listens only on the channels it has a use for.
        """
        if channel not in self._handlers:
            self._handlers[channel] = handler
            self._changed.set()

    def remove(self, channel: str) -> None:
        """Stop listening on ``channel`` as soon as the connection can; ``add`` takes it up again."""
        if self._handlers.pop(channel, None) is not None:
            self._changed.set()

    async def stop(self) -> None:
        await self._background.stop()

    async def _run(self) -> None:
        failures = 0
        while True:
            connection: asyncpg.Connection | None = None
            try:
                connection = await asyncpg.connect(
                    self._dsn, timeout=10, server_settings={"application_name": LISTENER_APPLICATION_NAME}
                )
                await self._follow_channels(connection)
                failures = 0
                self.connected.set()
                self._on_connect()
                while True:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self._check_interval):
                            await self._changed.wait()
                    if self._changed.is_set():
                        if await self._follow_channels(connection):
                            # What a new channel carried before its LISTEN is looked for at once too.
                            self._on_connect()
                        continue
                    await connection.fetchval("SELECT 1", timeout=5)
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                self.connected.clear()
                self.listening = set()
                self._callbacks.clear()
                failures += 1
                self._log_failure(exc)
                await asyncio.sleep(random.uniform(0, min(10.0, 0.1 * 2**failures)))  # noqa: S311 - jitter
            finally:
                if connection is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(connection.close(), 2)

    async def _follow_channels(self, connection: asyncpg.Connection) -> bool:
        """LISTEN to the channels added, UNLISTEN the ones removed; return whether any was added."""
        self._changed.clear()
        for channel in self.listening - self._handlers.keys():
            await connection.remove_listener(channel, self._callbacks.pop(channel))
            self.listening.discard(channel)
        added = False
        for channel, handler in list(self._handlers.items()):
            if channel not in self.listening:
                callback = self._callbacks[channel] = _callback(handler)
                await connection.add_listener(channel, callback)
                self.listening.add(channel)
                added = True
        return added

    def _log_failure(self, exc: BaseException) -> None:
        # A database outage would otherwise log this line several times a second.
        now = time.monotonic()
        if now - self._last_error_log >= _ERROR_LOG_INTERVAL:
            self._last_error_log = now
            logger.warning("storage.listener_lost", error=f"{type(exc).__name__}: {exc}")


class DriverPool:
    """The connections for the statements Conveyor sends straight to asyncpg.

    Those are the ones every job pays for: an enqueue, a claim, an ack, a read of one job.
    SQLAlchemy's pool costs about 0.1 ms of Python per checkout (a greenlet hop, pool events,
    the reset on return), and asyncpg's own about 80 µs of CPU per use (a task for the acquire's
    timeout, another that shields the release, a proxy around every call): each as much as the
    statement's whole round trip. Here an idle connection is taken and given back with no await
    at all. Transactions that SQLAlchemy builds keep its pool.

    A connection comes back for reuse unless what ran on it failed short of an answer from the
    server (a lost connection, a cancelled or timed-out statement) or left a transaction open:
    then it is closed in the background, as asyncpg closes one (the server is asked to cancel
    a statement still running, and rolls back an open transaction), and the next caller opens
    a fresh one.
    """

    def __init__(self, dsn: str, *, max_size: int, acquire_timeout: float, connect_args: Mapping[str, Any]) -> None:
        self._dsn = dsn
        self._max_size = max_size
        self._acquire_timeout = acquire_timeout
        self._connect_args = dict(connect_args)
        # Last in, first out: the connections in use stay warm, and the rest close once idle.
        self._idle: list[tuple[asyncpg.Connection, float]] = []
        self._open = 0
        """Connections open or being opened, in use or idle."""
        # Each waiter gets a connection, or None: one closed, so the waiter may open another.
        self._waiters: collections.deque[asyncio.Future[asyncpg.Connection | None]] = collections.deque()
        self._closing: set[asyncio.Task[None]] = set()
        self._closed = False

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncGenerator[asyncpg.Connection]:
        connection = self._take_idle()
        if connection is None:
            connection = await self._acquire()
        try:
            yield connection
        except BaseException as exc:
            # A server's error leaves the connection ready for the next statement; anything else
            # (a dropped connection, a statement cancelled mid-flight) may not have.
            self._give_back(connection, reusable=isinstance(exc, asyncpg.PostgresError))
            raise
        self._give_back(connection, reusable=True)

    async def open(self) -> None:
        """Open the first connection now, rather than in the first enqueue or claim (about 4 ms)."""
        if self._open == 0:
            self._open += 1
            try:
                connection = await self._connect()
            except BaseException:
                self._forget()
                raise
            self._give_back(connection, reusable=True)

    async def close(self) -> None:
        """Close the idle connections; those in use close as they come back."""
        self._closed = True
        idle, self._idle = self._idle, []
        self._open -= len(idle)
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(asyncpg.InterfaceError("the store is closed"))
        self._waiters.clear()
        await asyncio.gather(*(_close(connection) for connection, _ in idle), *self._closing)

    def _take_idle(self) -> asyncpg.Connection | None:
        while self._idle:
            connection, _ = self._idle.pop()
            if not connection.is_closed():
                return connection
            self._forget()  # the server ended it while it sat idle
        return None

    async def _acquire(self) -> asyncpg.Connection:
        if self._closed:
            raise asyncpg.InterfaceError("the store is closed")
        async with asyncio.timeout(self._acquire_timeout):
            while True:
                if self._open < self._max_size:
                    self._open += 1
                    try:
                        return await self._connect()
                    except BaseException:
                        self._forget()
                        raise
                waiter: asyncio.Future[asyncpg.Connection | None] = asyncio.get_running_loop().create_future()
                self._waiters.append(waiter)
                try:
                    connection = await waiter
                except BaseException:
                    with contextlib.suppress(ValueError):
                        self._waiters.remove(waiter)
                    # Handed a connection just as the wait ended: it goes to the next caller.
                    if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                        handed = waiter.result()
                        if handed is not None:
                            self._give_back(handed, reusable=True)
                        else:
                            self._pass_room_on()
                    raise
                if connection is not None:
                    return connection

    async def _connect(self) -> asyncpg.Connection:
        return await asyncpg.connect(self._dsn, **self._connect_args)

    def _give_back(self, connection: asyncpg.Connection, *, reusable: bool) -> None:
        if self._closed or connection.is_closed():
            connection.terminate()
            self._forget()
            return
        if not reusable or connection.is_in_transaction():
            # Counted as open until it is closed: the pool never holds more than its size.
            closing = asyncio.get_running_loop().create_task(self._close_and_forget(connection))
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(connection)
                return
        now = time.monotonic()
        self._idle.append((connection, now))
        # The coldest connection, idle this long, is not needed: the pool shrinks after a burst.
        oldest, since = self._idle[0]
        if len(self._idle) > 1 and now - since > _IDLE_LIFETIME_SECONDS:
            del self._idle[0]
            oldest.terminate()
            self._forget()

    async def _close_and_forget(self, connection: asyncpg.Connection) -> None:
        try:
            await _close(connection)
        finally:
            self._forget()

    def _forget(self) -> None:
        """One connection fewer: a caller waiting may open one in its place."""
        self._open -= 1
        self._pass_room_on()

    def _pass_room_on(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return


_IDLE_LIFETIME_SECONDS = 300.0
_CLOSE_TIMEOUT_SECONDS = 10.0


async def _close(connection: asyncpg.Connection) -> None:
    """Close as asyncpg closes (a statement still running is cancelled first), or cut it off."""
    try:
        await asyncio.wait_for(connection.close(), _CLOSE_TIMEOUT_SECONDS)
    except asyncio.CancelledError:
        connection.terminate()
        raise
    except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
        connection.terminate()


def _callback(handler: Callable[[str], None]) -> Callable[..., None]:
    def on_notification(_connection: Any, _pid: int, _channel: str, payload: str) -> None:
        handler(payload)

    return on_notification


def is_asyncpg_connection(connection: Any) -> bool:
    return isinstance(connection, asyncpg.Connection)


_INSERT_COLUMNS = (
    "id",
    "task",
    "queue",
    "priority",
    "state",
    "args",
    "kwargs",
    "attempt",
    "max_attempts",
    "timeout_seconds",
    "run_at",
    "history",
    "idempotency_key",
    "request_digest",
    "unique_key",
    "trace_context",
    "correlation_id",
    "workflow_id",
    "parent_id",
    "created_at",
    "updated_at",
)
_JSON_COLUMNS = {"args", "kwargs", "history", "trace_context"}
_ALL_JSON = {*_JSON_COLUMNS, "result", "error", "trace_context", "progress"}


def _insert_sql() -> str:
    placeholders = ", ".join(
        f"${index}::jsonb" if column in _JSON_COLUMNS else f"${index}"
        for index, column in enumerate(_INSERT_COLUMNS, start=1)
    )
    return (
        f"INSERT INTO conveyor_jobs ({', '.join(_INSERT_COLUMNS)}) VALUES ({placeholders}) "  # noqa: S608 - constant columns
        "ON CONFLICT DO NOTHING"
    )


_INSERT_SQL = _insert_sql()


async def insert_on_asyncpg(connection: Any, rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Insert job rows on the caller's asyncpg connection, inside whatever transaction it has open.

    Returns the stored rows of jobs holding the batch's idempotency keys or (unfinished) unique keys.
    """
    records = [_insert_record(row) for row in rows]
    await connection.executemany(_INSERT_SQL, records)
    queues = sorted({row["queue"] for row in rows if row["state"] == "queued"})
    if queues:
        await connection.execute("SELECT pg_notify($1, q) FROM unnest($2::text[]) AS q", JOBS_CHANNEL, queues)
    keys = [row["idempotency_key"] for row in rows if row["idempotency_key"] is not None]
    unique_keys = [row["unique_key"] for row in rows if row["unique_key"] is not None]
    if not keys and not unique_keys:
        return []
    # JSON columns come back as text whatever codecs the connection has (SQLAlchemy's decode
    # jsonb, a bare asyncpg connection does not), and are decoded here, once.
    found = await connection.fetch(_EXISTING_SQL, keys, unique_keys)
    return [_decoded(record) for record in found]


def _decoded(record: Mapping[str, Any]) -> dict[str, Any]:
    """A fetched row with its JSON columns (selected as text) decoded."""
    row = dict(record)
    for name in _ALL_JSON:
        value = row.get(name)
        if value is not None:
            row[name] = loads(value)
    return row


_ALL_COLUMNS = (
    *_INSERT_COLUMNS,
    "lease_owner",
    "lease_expires_at",
    "attempted_at",
    "finished_at",
    "cancel_requested_at",
    "progress",
    "result",
    "error",
)
# Every column, JSON ones as text: decoded once by ``_decoded``, whatever codecs the connection has.
_RETURNING = ", ".join(f"{column}::text AS {column}" if column in _ALL_JSON else column for column in _ALL_COLUMNS)
_EXISTING_SQL = (
    f"SELECT {_RETURNING} FROM conveyor_jobs WHERE idempotency_key = ANY($1::text[])"  # noqa: S608 - constant columns
    " OR (unique_key = ANY($2::text[]) AND state IN ('scheduled', 'queued', 'running', 'retrying'))"
)


_pick_inserted = operator.itemgetter(*_INSERT_COLUMNS)
_JSON_POSITIONS = tuple(position for position, column in enumerate(_INSERT_COLUMNS) if column in _JSON_COLUMNS)
_STATE_POSITION = _INSERT_COLUMNS.index("state")


def _insert_record(row: Mapping[str, Any]) -> tuple[Any, ...]:
    """A job row as the driver's record of ``_INSERT_COLUMNS``: JSON columns as text, the state as its text.

    Picked in one C call and patched in the few places that need it: an insert in the caller's
    transaction builds one per job, and a per-column conversion cost as much as the rest of the
    row's way to the server.
    """
    record = list(_pick_inserted(row))
    for position in _JSON_POSITIONS:
        value = record[position]
        if value is not None:
            record[position] = dumps(value)
    record[_STATE_POSITION] = str(record[_STATE_POSITION])
    return tuple(record)


# -- single-statement fast paths ------------------------------------------------------------
# Run on a pooled connection in autocommit: one statement is one transaction and one round trip,
# where BEGIN, the statement, a NOTIFY and COMMIT cost four. An enqueue or a claim is then about
# one commit's latency, which is what an idle worker's wake-up to start time is made of.

_RECORD_TYPES = {
    "priority": "int",
    "attempt": "int",
    "max_attempts": "int",
    "timeout_seconds": "float8",
    "run_at": "timestamptz",
    "created_at": "timestamptz",
    "updated_at": "timestamptz",
    **dict.fromkeys(_JSON_COLUMNS, "jsonb"),
}


def _bulk_insert_sql() -> str:
    names = ", ".join(_INSERT_COLUMNS)
    record = ", ".join(f"{column} {_RECORD_TYPES.get(column, 'text')}" for column in _INSERT_COLUMNS)
    return (
        f"WITH inserted AS (INSERT INTO conveyor_jobs ({names}) "  # noqa: S608 - constant columns
        f"SELECT {names} FROM jsonb_to_recordset($1::text::jsonb) AS r({record}) "
        "ON CONFLICT DO NOTHING RETURNING queue, state) "
        f"SELECT pg_notify('{JOBS_CHANNEL}', queue) FROM (SELECT DISTINCT queue FROM inserted WHERE state = 'queued') q"
    )


_BULK_INSERT_SQL = _bulk_insert_sql()


# One job, as a row of parameters: the server plans and runs it in about 0.1 ms less than the
# same row unpacked from a JSON document, a sixth of an idle single enqueue's round trip.
_SINGLE_INSERT_SQL = (
    f"WITH inserted AS ({_INSERT_SQL} RETURNING queue, state) "  # noqa: S608 - constant statement
    f"SELECT pg_notify('{JOBS_CHANNEL}', queue) FROM inserted WHERE state = 'queued'"
)


async def insert_in_one_statement(connection: Any, rows: Sequence[Mapping[str, Any]]) -> None:
    """Insert job rows (without idempotency or unique keys) and announce their queues, in one statement.

    A batch travels as one JSON document that the server unpacks: orjson writes it far faster
    than the driver encodes a column array per field, and a JSON null arrives as SQL NULL.
    """
    if len(rows) == 1:
        await connection.execute(_SINGLE_INSERT_SQL, *_insert_record(rows[0]))
        return
    await connection.execute(_BULK_INSERT_SQL, dumps(rows))


# A bulk insert's columns besides the id, each sent as one array (``unnest`` makes rows of them)
# or, when the whole batch shares its value, once: (column, array type, NOT NULL). A shared NOT
# NULL value goes as a scalar that COALESCE fills in; a nullable column that is NULL throughout
# goes as a NULL array, which unnest pads with NULLs. Sending each shared value once saves the
# client most of its encoding (a timestamp alone costs the driver 0.6 µs) and costs the server nothing.
_BULK_COLUMNS = (
    ("task", "text", True),
    ("queue", "text", True),
    ("priority", "int", True),
    ("state", "text", True),
    ("args", "text", True),
    ("kwargs", "text", True),
    ("max_attempts", "int", True),
    ("run_at", "timestamptz", True),
    ("timeout_seconds", "float8", False),
    ("trace_context", "text", False),
    ("correlation_id", "text", False),
    ("workflow_id", "text", False),
    ("parent_id", "text", False),
)
_BULK_JSON = {"args", "kwargs", "trace_context"}
_BULK_SHARED = tuple(column for column, _, not_null in _BULK_COLUMNS if not_null)


def _bulk_unnest_sql() -> str:
    arrays = ["$1::text[]"]
    values = ["u.id"]
    for index, (column, kind, not_null) in enumerate(_BULK_COLUMNS, start=2):
        # Every array travels as text[]: asyncpg has that codec at hand, where an int[], float8[] or
        # timestamptz[] parameter costs each new connection a query for the type (10 to 30 ms here)
        # the first time it is sent, which was most of a first bulk enqueue's time.
        arrays.append(f"${index}::text[]" if kind == "text" else f"${index}::text[]::{kind}[]")
        # Each side cast on its own: a shared JSON value is then parsed once, not once a row.
        cast = "::jsonb" if column in _BULK_JSON else ""
        value = f"u.{column}{cast}"
        if not_null:
            shared = len(_BULK_COLUMNS) + 2 + _BULK_SHARED.index(column)
            value = f"COALESCE({value}, ${shared}::{kind}{cast})"
        values.append(value)
    names = ", ".join(["id", *(column for column, _, _ in _BULK_COLUMNS)])
    now_index = len(_BULK_COLUMNS) + 2 + len(_BULK_SHARED)
    now = f"${now_index}::timestamptz"
    # The part's queues are announced by the same statement, saving the batch a round trip. A
    # NOTIFY goes out only at COMMIT, and the same queue announced by several parts goes once.
    return (
        f"WITH inserted AS (INSERT INTO conveyor_jobs ({names}, attempt, history, created_at, updated_at) "  # noqa: S608
        f"SELECT {', '.join(values)}, 0, '[]'::jsonb, {now}, {now} "
        f"FROM unnest({', '.join(arrays)}) AS u({names})) "
        f"SELECT pg_notify('{JOBS_CHANNEL}', queue) FROM unnest(${now_index + 1}::text[]) AS queue"
    )


_BULK_UNNEST_SQL = _bulk_unnest_sql()


def _as_text(value: Any) -> str:
    """A number or an aware datetime as text that PostgreSQL casts back to the same value."""
    return value.isoformat() if isinstance(value, datetime) else str(value)


_bulk_getters = tuple(operator.attrgetter(column) for column, _, _ in _BULK_COLUMNS)


def _bulk_arguments(part: Sequence[Job]) -> list[Any]:
    """The arguments of ``_BULK_UNNEST_SQL`` for new jobs that share their creation time."""
    arrays: list[list[Any] | None] = [[job.id for job in part]]
    shared: list[Any] = []
    for (column, kind, not_null), getter in zip(_BULK_COLUMNS, _bulk_getters, strict=True):
        values: list[Any] = list(map(getter, part))
        if column in _BULK_JSON:
            values = [None if value is None else dumps(value) for value in values]
        elif column == "state":
            values = list(map(str, values))
        everywhere = values.count(values[0]) == len(values)
        if not_null:
            shared.append(values[0] if everywhere else None)
        if everywhere and (not_null or values[0] is None):
            arrays.append(None)
        else:
            # Only a column that travels as an array pays for its text (a timestamp's is 0.5 µs).
            arrays.append(
                values if kind == "text" else [None if value is None else _as_text(value) for value in values]
            )
    runnable_queues = sorted({job.queue for job in part if job.state == "queued"})
    return [*arrays, *shared, part[0].created_at, runnable_queues]


async def insert_in_parts(connection: Any, parts: AsyncGenerator[Sequence[Job]]) -> list[Job]:
    """Insert new jobs (without idempotency or unique keys) and announce their queues, in one transaction.

    Returns every job of ``parts``. Each part is one statement; the next part is built while the
    previous one is stored. A batch retried after its commit landed unseen finds its own ids
    already stored: the ids are this batch's, so that means the batch is in, and it counts as
    done. (Checking that after a conflict, rather than skipping conflicts with ON CONFLICT,
    spares every insert a third of its cost: the speculative insertion into each unique index.)
    """
    inserted: list[Job] = []
    async with contextlib.aclosing(parts):
        try:
            await _insert_parts(connection, parts, inserted)
        except asyncpg.UniqueViolationError:
            inserted.extend([job async for part in parts for job in part])
            ids = [job.id for job in inserted]
            stored = await connection.fetchval("SELECT count(*) FROM conveyor_jobs WHERE id = ANY($1::text[])", ids)
            if stored != len(ids):
                raise
    return inserted


async def _insert_parts(connection: Any, parts: AsyncGenerator[Sequence[Job]], inserted: list[Job]) -> None:
    transaction = connection.transaction()
    # BEGIN goes out while the first part is built, which would otherwise wait for its round trip.
    beginning = asyncio.ensure_future(transaction.start())
    inserting: asyncio.Future[Any] = beginning
    try:
        async for part in parts:
            inserted.extend(part)
            arguments = _bulk_arguments(part)
            await inserting
            inserting = asyncio.ensure_future(connection.execute(_BULK_UNNEST_SQL, *arguments))
        await inserting
    except BaseException:
        # An insert still out is cancelled; BEGIN, one round trip, is let finish so that the
        # transaction it opened is rolled back here rather than left to the pool.
        if inserting is not beginning and not inserting.done():
            inserting.cancel()
        await asyncio.gather(beginning, inserting, return_exceptions=True)
        if not beginning.cancelled() and beginning.exception() is None:
            await transaction.rollback()
        raise
    await transaction.commit()


_GET_SQL = f"SELECT {_RETURNING}, waiting_on FROM conveyor_jobs WHERE id = ANY($1::text[])"  # noqa: S608 - constant


async def get_in_one_statement(connection: Any, job_ids: Sequence[str]) -> list[dict[str, Any]]:
    """The rows of the jobs that exist among ``job_ids``, JSON decoded: the read behind every poll of a job."""
    return [_decoded(record) for record in await connection.fetch(_GET_SQL, list(job_ids))]


_RUNNABLE_IN = "state IN ('queued', 'scheduled', 'retrying')"
# The state list is written out, not a parameter, so the planner can use the partial index of
# runnable jobs (its predicate names these states). Each queue is read with `queue = ...`, never
# `queue = ANY(...)`: only an equality on the index's first column lets the scan walk the index in
# claim order and stop at the limit; with ANY the server reads and sorts every due job per claim.
_CLAIM_ONE_QUEUE = (
    f"SELECT id FROM conveyor_jobs WHERE {_RUNNABLE_IN} AND run_at <= $3 AND queue = $4 "  # noqa: S608 - constant
    "ORDER BY priority DESC, run_at, id LIMIT $5 FOR UPDATE SKIP LOCKED"
)
# Several queues: the first `limit` of each, in index order, then the best `limit` of those.
_CLAIM_QUEUES = (
    "SELECT due.id FROM unnest($4::text[]) AS wanted(queue) CROSS JOIN LATERAL ("  # noqa: S608 - constant
    f"SELECT id, priority, run_at FROM conveyor_jobs WHERE {_RUNNABLE_IN} AND run_at <= $3 "
    "AND queue = wanted.queue ORDER BY priority DESC, run_at, id LIMIT $5 FOR UPDATE SKIP LOCKED) AS due "
    "ORDER BY due.priority DESC, due.run_at, due.id LIMIT $5"
)


# The claim commits without waiting for its WAL to reach disk (synchronous_commit off, for this
# statement's transaction only): a claim is a lease, not a result. If the server crashed before
# the WAL writer flushed it (within a fraction of a second), the job would simply be runnable
# again, as after any lost lease, and run again: at least once, as always. Every later durable
# commit (the ack first of all) flushes the claim along with it. It saves a disk flush on the
# path from an idle worker's wake-up to the job's start.
_ASYNC_COMMIT = "WITH lease AS MATERIALIZED (SELECT set_config('synchronous_commit', 'off', true)) "


# A claim reads its jobs back as Job's fields, in Job's order, so that each record becomes a Job
# by position: through a dict per row and a lookup per field it cost the worker about 3 µs more a
# job. What the claim sets from its own parameters is not read back (NULL, filled in here):
# decoding three timestamps and two strings per job that the caller already holds cost the worker
# about a tenth of its time per job.
_JOB_FIELDS = tuple(item.name for item in dataclasses.fields(Job))
_SET_BY_CLAIM = ("state", "lease_owner", "lease_expires_at", "attempted_at", "updated_at")
_CLAIM_RETURNING = ", ".join(
    f"NULL AS {name}" if name in _SET_BY_CLAIM else f"{name}::text AS {name}" if name in _ALL_JSON else name
    for name in _JOB_FIELDS
)
_CLAIMED_JSON = tuple(_JOB_FIELDS.index(name) for name in ("args", "kwargs", "progress", "result", "trace_context"))
_CLAIMED_ERROR = _JOB_FIELDS.index("error")
_CLAIMED_HISTORY = _JOB_FIELDS.index("history")
_CLAIMED_STATE, _CLAIMED_LEASE_OWNER, _CLAIMED_LEASE_EXPIRES_AT, _CLAIMED_ATTEMPTED_AT, _CLAIMED_UPDATED_AT = map(
    _JOB_FIELDS.index, _SET_BY_CLAIM
)
_build_job = fast_constructor(Job)


def _claim_sql(due: str) -> str:
    # `id = ANY(ARRAY(due))`, not `id IN (due)`: the chosen ids become one array, and each row is
    # then found by its key. With IN the planner would rather hash the chosen ids and scan the
    # whole table for them, finished jobs and all: a 1,000-job claim took 11 ms against 10,000
    # rows and 45 ms against 150,000, where it now takes 10 to 11 ms at either size.
    return (
        _ASYNC_COMMIT + "UPDATE conveyor_jobs SET state = 'running', attempt = attempt + 1, lease_owner = $1, "  # noqa: S608 - constant
        "lease_expires_at = $2, attempted_at = $3, updated_at = $3 "
        f"WHERE id = ANY(ARRAY({due})) AND EXISTS (SELECT FROM lease) RETURNING {_CLAIM_RETURNING}"
    )


_CLAIM_ONE_QUEUE_SQL = _claim_sql(_CLAIM_ONE_QUEUE)
_CLAIM_QUEUES_SQL = _claim_sql(_CLAIM_QUEUES)


async def claim_in_one_statement(
    connection: Any, *, queues: Sequence[str], limit: int, lease_owner: str, lease_expires_at: Any, now: Any
) -> list[Job]:
    """Claim up to ``limit`` due jobs in one statement; return them as they now stand (in no set order).

    ``lease_expires_at`` and ``now`` must be in UTC: the jobs carry them as the claim stored them.
    """
    if len(queues) == 1:
        found = await connection.fetch(_CLAIM_ONE_QUEUE_SQL, lease_owner, lease_expires_at, now, queues[0], limit)
    else:
        found = await connection.fetch(_CLAIM_QUEUES_SQL, lease_owner, lease_expires_at, now, list(queues), limit)
    claimed = []
    for record in found:
        fields = list(record)
        for position in _CLAIMED_JSON:
            value = fields[position]
            if value is not None:
                fields[position] = loads(value)
        error = fields[_CLAIMED_ERROR]
        fields[_CLAIMED_ERROR] = JobError.from_json(loads(error)) if error is not None else None
        history = fields[_CLAIMED_HISTORY]
        fields[_CLAIMED_HISTORY] = tuple(map(AttemptRecord.from_json, loads(history))) if history is not None else ()
        fields[_CLAIMED_STATE] = JobState.RUNNING
        fields[_CLAIMED_LEASE_OWNER] = lease_owner
        fields[_CLAIMED_LEASE_EXPIRES_AT] = lease_expires_at
        fields[_CLAIMED_ATTEMPTED_AT] = fields[_CLAIMED_UPDATED_AT] = now
        claimed.append(_build_job(*fields))
    return claimed


# The ack statement's named parameters, in the order the driver takes them positionally.
_ACK_PARAMETERS = ("now", "channel", "batch")
_ACK_SQL = POSTGRES_BULK_ACK_AND_NOTIFY.text
for _position, _name in enumerate(_ACK_PARAMETERS, 1):
    _ACK_SQL = re.sub(rf"(?<!:):{_name}\b", f"${_position}", _ACK_SQL)


# One ack, as a row of parameters: the job is found by its key and the plan is made once. The
# batch form joins the job table to the unpacked batch, which the server plans anew each time
# (about 0.3 ms) and, on a table of a few thousand jobs, by reading all of them: a lone ack took
# 0.8 to 1.3 ms there, against 0.5 ms here, on the path of every job of an idle worker.
_SINGLE_ACK_SQL = (
    "WITH acked AS (UPDATE conveyor_jobs SET state = $4, result = $5::jsonb, error = $6::jsonb, "
    "run_at = COALESCE($7, run_at), finished_at = $1, attempt = attempt + $8, "
    "history = history || jsonb_build_array($9::jsonb), lease_owner = NULL, lease_expires_at = NULL, updated_at = $1 "
    """WHERE id = $3 AND state COLLATE "C" = 'running' AND lease_owner = $10 RETURNING id) """
    "SELECT id, pg_notify($2, id) FROM acked"
)


async def ack_in_one_statement(connection: Any, acks: Sequence[Ack], now: Any) -> set[str]:
    """Finish jobs and announce them, in one autocommit statement; return the ids that landed.

    Every ack must finish its job outside any workflow. Sent straight to the driver: the
    statement is fixed, and going through SQLAlchemy's text construct would cost more per batch
    than the server spends on it.
    """
    if len(acks) == 1:
        ack = acks[0]
        found = await connection.fetch(
            _SINGLE_ACK_SQL,
            now,
            FINISHED_CHANNEL,
            ack.job_id,
            ack.state.value,
            None if ack.result is None else dumps(ack.result),
            None if ack.error is None else dumps(ack.error),
            ack.run_at,
            ack.attempt_delta,
            dumps(ack.record),
            ack.lease_owner,
        )
    else:
        found = await connection.fetch(_ACK_SQL, now, FINISHED_CHANNEL, postgres_ack_batch(acks, now))
    return {record[0] for record in found}
