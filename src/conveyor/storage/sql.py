"""The SQL store: every query Conveyor runs, written once for SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import operator
import sqlite3
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from types import CoroutineType
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

import asyncpg
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_random_exponential,
)

from conveyor.errors import ConveyorError, JobNotFoundError, JobStateError, StorageError
from conveyor.jobs import (
    CANCELLABLE_STATES,
    FINISHED_STATES,
    REPLAYABLE_STATES,
    Ack,
    AttemptRecord,
    Job,
    JobError,
    JobFilter,
    JobState,
    NewJob,
    Outcome,
    Page,
    QueueStats,
    TokenRecord,
    fast_constructor,
)
from conveyor.limits import ClaimLimits
from conveyor.storage import dialects
from conveyor.storage import limits as limited_claims
from conveyor.storage import workflows as workflow_store
from conveyor.storage.commits import CommitWatch
from conveyor.storage.schema import IS_RUNNABLE, JSONType, UTCDateTime, checked_state, jobs, tokens, workflows
from conveyor.workflows import CompiledWorkflow, Workflow, order_jobs

if TYPE_CHECKING:
    from conveyor.storage.postgres import DriverPool

_FINISHED = [state.value for state in FINISHED_STATES]

P = ParamSpec("P")

# From this many keyless jobs, a PostgreSQL bulk enqueue goes in parts, in one transaction: BEGIN,
# a statement a part (each announcing its queues) and COMMIT instead of one round trip, repaid
# many times over by the client building each part while the server stores the one before.
_PARTS_FROM = 64
R = TypeVar("R")


def _guarded(
    method: Callable[Concatenate[SqlStore, P], CoroutineType[Any, Any, R]],
) -> Callable[Concatenate[SqlStore, P], CoroutineType[Any, Any, R]]:
    """Retry transient database errors with backoff, then translate what is left.

    Safe because every write is one transaction whose effect is fenced by state: running it
    again after a failed commit changes nothing twice. A call inside the caller's own
    transaction (``connection=``) is not retried: the caller owns that transaction.
    """

    @functools.wraps(method)
    async def wrapper(self: SqlStore, *args: P.args, **kwargs: P.kwargs) -> R:
        retryable = kwargs.get("connection") is None
        try:
            # The first try runs bare: nearly every call succeeds at once, and setting up the
            # retry loop would cost as much Python as reading one job. A failed first try is
            # tried again at once (on another connection), then with backoff.
            try:
                return await method(self, *args, **kwargs)
            except Exception as exc:
                if not (retryable and dialects.is_transient(exc)):
                    raise
            async for attempt in AsyncRetrying(
                retry=retry_if_exception(lambda exc: retryable and dialects.is_transient(exc)),
                stop=stop_after_attempt(7) | stop_after_delay(30),
                wait=wait_random_exponential(multiplier=0.05, max=2),
                reraise=True,
            ):
                with attempt:
                    return await method(self, *args, **kwargs)
        except ConveyorError:
            raise
        except (sa_exc.SQLAlchemyError, sqlite3.Error, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            original = getattr(exc, "orig", None) or exc
            detail = str(original).splitlines()[0] if str(original) else type(original).__name__
            raise StorageError(f"{getattr(method, '__name__', 'query')} failed: {detail}") from exc
        raise AssertionError("unreachable: tenacity either returns or re-raises")  # pragma: no cover

    return wrapper


def _answered_at_once(
    method: Callable[Concatenate[SqlStore, P], CoroutineType[Any, Any, R]],
) -> Callable[Concatenate[SqlStore, P], CoroutineType[Any, Any, R]]:
    """Translate errors but never retry: for checks (readiness) that must answer now."""

    @functools.wraps(method)
    async def wrapper(self: SqlStore, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await method(self, *args, **kwargs)
        except ConveyorError:
            raise
        except (sa_exc.SQLAlchemyError, sqlite3.Error, OSError, TimeoutError) as exc:
            raise StorageError(f"{getattr(method, '__name__', 'query')} failed: {type(exc).__name__}") from exc

    return wrapper


def _json_text(value: Any) -> str:
    return dialects.dumps(value)


_sqlite_text = dialects.sqlite_text


def _sqlite_time(value: datetime | None) -> str | None:
    return None if value is None else _sqlite_text(value)


def _as_utc(value: datetime) -> datetime:
    """A stored timestamp comes back in UTC; naive values are left for the column type to refuse."""
    return value.astimezone(UTC) if value.tzinfo is not None else value


_STATES = {state.value: state for state in JobState}
_build_job = fast_constructor(Job)


def _row_to_job(row: Mapping[str, Any]) -> Job:
    # Positional, in Job's field order: a claim builds one per job, and keywords cost twice as much.
    # (tests/storage check every field of a stored job, so a field out of order fails them.)
    error = row["error"]
    history = row["history"]
    return _build_job(
        row["id"],
        row["task"],
        row["queue"],
        row["priority"],
        _STATES[row["state"]],
        row["args"],
        row["kwargs"],
        row["attempt"],
        row["max_attempts"],
        row["run_at"],
        row["created_at"],
        row["updated_at"],
        row["timeout_seconds"],
        row["lease_owner"],
        row["lease_expires_at"],
        row["attempted_at"],
        row["finished_at"],
        row["cancel_requested_at"],
        row["progress"],
        row["result"],
        JobError.from_json(error) if error else None,
        tuple(AttemptRecord.from_json(entry) for entry in history) if history else (),
        row["idempotency_key"],
        row["request_digest"],
        row["unique_key"],
        row["trace_context"],
        row["correlation_id"],
        row["parent_id"],
        row["workflow_id"],
        # Rows read by the raw PostgreSQL insert path don't select it; those jobs wait on nothing.
        row.get("waiting_on") or 0,
    )


def _new_stored_job(new: NewJob, now: datetime) -> Job:
    """A new job exactly as its row reads once stored (times in UTC): what an enqueue returns."""
    now = _as_utc(now)
    run_at = now if new.run_at is None else _as_utc(new.run_at)
    state = JobState.WAITING if new.waiting_on > 0 else JobState.SCHEDULED if run_at > now else JobState.QUEUED
    # Positional, in Job's field order, as in _row_to_job.
    return _build_job(
        new.id,
        new.task,
        new.queue,
        new.priority,
        state,
        new.args,
        new.kwargs,
        0,
        new.max_attempts,
        run_at,
        now,
        now,
        new.timeout_seconds,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
        (),
        new.idempotency_key,
        new.request_digest,
        new.unique_key,
        new.trace_context,
        new.correlation_id,
        new.parent_id,
        new.workflow_id,
        new.waiting_on,
    )


_JOB_FIELDS = tuple(item.name for item in dataclasses.fields(Job))
_job_values = operator.attrgetter(*_JOB_FIELDS)


def _new_row(job: Job, new: NewJob) -> dict[str, Any]:
    """The row to insert for a new job (``job`` from ``_new_stored_job``)."""
    row = dict(zip(_JOB_FIELDS, _job_values(job), strict=True))
    row["input_template"] = new.input_template
    return row


# Jobs an insert statement of a bulk enqueue carries. The server stores one part while the client
# builds the next, where one statement for the whole batch would have each wait for the other.
_INSERT_PART = 200
_JOBS_PER_SLICE = 50


async def _stored_in_parts(new_jobs: Sequence[NewJob], now: datetime) -> AsyncGenerator[list[Job]]:
    """The stored form of ``new_jobs``, a part at a time.

    Built a slice at a time, yielding to the loop between slices, so the insert of the previous
    part goes on being sent and answered meanwhile.
    """
    for start in range(0, len(new_jobs), _INSERT_PART):
        part: list[Job] = []
        for offset in range(start, min(start + _INSERT_PART, len(new_jobs)), _JOBS_PER_SLICE):
            await asyncio.sleep(0)
            end = min(offset + _JOBS_PER_SLICE, start + _INSERT_PART)
            part.extend(_new_stored_job(new, now) for new in new_jobs[offset:end])
        yield part


class _SharedReads:
    """Reads of single jobs that arrive together are answered by one query.

    The first waits for no one: its query goes at once. Whatever asks while that query is out
    forms the next. Clients polling their jobs then cost one query per round, not one each; on
    SQLite each query is a hop into the connection's thread and back, which under load waits
    its turn for the interpreter lock.
    """

    def __init__(self, read: Callable[[list[str]], Awaitable[dict[str, Job]]], max_batch: int = 500) -> None:
        self._read = read
        self._max_batch = max_batch
        self._pending: list[tuple[str, asyncio.Future[Job | None]]] = []
        self._reading: asyncio.Task[None] | None = None

    async def get(self, job_id: str) -> Job | None:
        found: asyncio.Future[Job | None] = asyncio.get_running_loop().create_future()
        self._pending.append((job_id, found))
        if self._reading is None or self._reading.done():
            self._reading = asyncio.create_task(self._read_pending(), name="conveyor-shared-reads")
        return await found

    async def _read_pending(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[: self._max_batch], self._pending[self._max_batch :]
            try:
                jobs = await self._read(list({job_id for job_id, _ in batch}))
            except asyncio.CancelledError:
                for _, found in batch:
                    found.cancel()
                raise
            except Exception as exc:  # noqa: BLE001 - each waiting caller gets the failure as its own
                for _, found in batch:
                    if not found.done():
                        found.set_exception(exc)
                continue
            for job_id, found in batch:
                if not found.done():
                    found.set_result(jobs.get(job_id))


class SqlStore:
    """The ``Store`` on SQLAlchemy Core. One instance serves one event loop."""

    def __init__(self, engine: AsyncEngine, driver: DriverPool | None = None) -> None:
        self._engine = engine
        # PostgreSQL: the per-job statements go straight to asyncpg, on its own pool.
        self._driver = driver
        self._write_engine = engine.execution_options(**{dialects.WRITE_OPTION: True})
        # PostgreSQL reads skip BEGIN/ROLLBACK, two round trips each. (On SQLite, switching a
        # connection to autocommit and back costs more than the transaction it saves.)
        self._read_engine = (
            engine.execution_options(isolation_level="AUTOCOMMIT") if engine.dialect.name == "postgresql" else engine
        )
        self.dialect = engine.dialect.name
        # SQLite has one writer at a time; queueing our own writers here is cheaper than
        # letting them meet in SQLite's busy handler, which sleeps.
        self._write_lock = asyncio.Lock() if self.dialect == "sqlite" else None
        self._work_added = asyncio.Event()
        # Queue sets whose last SQLite claim took all it asked for (see fetch_jobs).
        self._claimed_in_full: set[tuple[str, ...]] = set()
        self._finish_listeners: list[Callable[[set[str]], None]] = []
        self._listener: Any = None
        self._commit_watch: CommitWatch | None = None
        self._commit_listeners: list[Callable[[], None]] = []
        self._reads = _SharedReads(self._read_jobs)

    @property
    def engine(self) -> AsyncEngine:
        return self._engine

    async def close(self) -> None:
        if self._listener is not None:
            await self._listener.stop()
            self._listener = None
        if self._commit_watch is not None:
            await self._commit_watch.stop()
            self._commit_watch = None
        if self._driver is not None:
            await self._driver.close()
        await self._engine.dispose()

    def _listen(self, *, finished: bool = False) -> None:
        """Listen for other processes' enqueues, or (``finished``) finished jobs: PostgreSQL, from when first needed.

        A worker listens for enqueues, a server for finished jobs (its long-polls); neither is
        woken by the other's channel, which for a worker would be every ack of every worker.
        """
        if self.dialect != "postgresql":
            return
        from conveyor.storage import postgres  # noqa: PLC0415 - PostgreSQL users only

        if self._listener is None:
            self._listener = postgres.Listener(postgres.asyncpg_dsn(self._engine.url), on_connect=self._work_added.set)
            self._listener.start()
        if finished:
            self._listener.add(postgres.FINISHED_CHANNEL, self._finished_notified)
        else:
            self._listener.add(postgres.JOBS_CHANNEL, self._jobs_notified)

    def _watch_commits(self) -> None:
        """Learn of other processes' commits (SQLite), from when a worker or a long-poll first waits.

        Not before: a server that nothing waits on would read an event for each of its own commits.
        """
        if self.dialect != "sqlite" or self._commit_watch is not None:
            return
        path = dialects.sqlite_path(self._engine.url)
        if path is not None:
            self._commit_watch = CommitWatch(path, self._commit_seen)
            self._commit_watch.start()

    def _commit_seen(self) -> None:
        self._work_added.set()
        for listener in self._commit_listeners:
            listener()

    def on_commits(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` soon after any process commits to the database (SQLite on Linux).

        For who must find changes made elsewhere and has no NOTIFY to tell it (see
        ``conveyor.storage.commits``); PostgreSQL never calls it.
        """
        self._commit_listeners.append(listener)
        self._watch_commits()

    async def _notify(self, conn: AsyncConnection, channel: str, payloads: Sequence[str]) -> None:
        """Queue NOTIFYs in this transaction: PostgreSQL delivers them at commit, once."""
        if self.dialect == "postgresql" and payloads:
            await conn.execute(
                sa.text("SELECT pg_notify(:channel, payload) FROM unnest(CAST(:payloads AS text[])) AS payload"),
                {"channel": channel, "payloads": list(payloads)},
            )

    async def _notify_finished(self, conn: AsyncConnection, job_ids: set[str]) -> None:
        if self.dialect == "postgresql" and job_ids:
            from conveyor.storage import postgres  # noqa: PLC0415 - PostgreSQL users only

            await self._notify(conn, postgres.FINISHED_CHANNEL, postgres.chunk_ids(sorted(job_ids)))

    def _driven(self) -> contextlib.AbstractAsyncContextManager[Any]:
        """A bare asyncpg connection in autocommit, for one statement (PostgreSQL)."""
        assert self._driver is not None, "open_store gives a PostgreSQL store its driver pool"
        return self._driver.connection()

    @contextlib.asynccontextmanager
    async def _writing(self, connection: AsyncConnection | None = None) -> AsyncGenerator[AsyncConnection]:
        if connection is not None:
            yield connection
            return
        async with contextlib.AsyncExitStack() as stack:
            if self._write_lock is not None:
                await stack.enter_async_context(self._write_lock)
            yield await stack.enter_async_context(self._write_engine.begin())

    # -- enqueue ------------------------------------------------------------------------

    @_guarded
    async def insert_jobs(
        self,
        new_jobs: Sequence[NewJob],
        *,
        now: datetime,
        connection: Any = None,
    ) -> list[Job]:
        """Insert jobs in one transaction; a job whose idempotency key exists returns the existing one.

        ``connection`` puts the insert inside the caller's open transaction: an SQLAlchemy
        ``AsyncConnection`` or ``AsyncSession``, or (PostgreSQL) an asyncpg connection. The jobs
        then appear to workers only when the caller commits, and vanish if it rolls back.
        """
        if not new_jobs:
            return []
        keys = [new.idempotency_key for new in new_jobs if new.idempotency_key is not None]
        # Without keys there is nothing to look up afterwards.
        keyless = not any(new.idempotency_key or new.unique_key for new in new_jobs)
        if connection is None and self.dialect == "postgresql" and keyless and len(new_jobs) >= _PARTS_FROM:
            from conveyor.storage import postgres  # noqa: PLC0415 - PostgreSQL users only

            async with self._driven() as driven:
                stored = await postgres.insert_in_parts(driven, _stored_in_parts(new_jobs, now))
            if any(job.state is JobState.QUEUED for job in stored):
                self._work_added.set()
            return stored
        stored = [_new_stored_job(new, now) for new in new_jobs]
        rows = [_new_row(job, new) for job, new in zip(stored, new_jobs, strict=True)]
        runnable_queues = sorted({job.queue for job in stored if job.state is JobState.QUEUED})
        if connection is not None and self.dialect == "postgresql":
            from conveyor.storage import postgres  # noqa: PLC0415 - PostgreSQL users only

            if postgres.is_asyncpg_connection(connection):
                existing = await postgres.insert_on_asyncpg(connection, rows)
                return self._inserted(new_jobs, stored, [_row_to_job(row) for row in existing])
        if isinstance(connection, AsyncSession):
            connection = await connection.connection()
        if connection is None and keyless:
            # Nothing to look up afterwards: the rows (and on PostgreSQL their NOTIFY) go in one
            # autocommit statement, one round trip however many jobs, with no BEGIN and COMMIT.
            if self.dialect == "postgresql":
                from conveyor.storage import postgres  # noqa: PLC0415 - PostgreSQL users only

                async with self._driven() as driven:
                    await postgres.insert_in_one_statement(driven, rows)
            else:
                assert self._write_lock is not None
                async with self._write_lock, self._engine.connect() as conn:
                    await dialects.sqlite_insert_rows((await conn.get_raw_connection()).driver_connection, rows)
            if runnable_queues:
                self._work_added.set()
            return stored
        if connection is None and self.dialect == "postgresql":
            async with self._writing() as conn:
                # The driver's own pipelined executemany: several times faster for big batches
                # than the generic path, with the same statement and the same transaction.
                from conveyor.storage import postgres  # noqa: PLC0415 - PostgreSQL users only

                raw = await conn.get_raw_connection()
                existing = await postgres.insert_on_asyncpg(raw.driver_connection, rows)
            if runnable_queues:
                self._work_added.set()
            return self._inserted(new_jobs, stored, [_row_to_job(row) for row in existing])
        async with self._writing(connection) as conn:
            # Duplicates are skipped, not errors: a retried insert whose first commit landed
            # must not fail, and a repeated idempotency key returns the first job.
            await conn.execute(dialects.insert_ignoring_duplicates(jobs, self.dialect), rows)
            existing: list[Job] = []
            unique_keys = [new.unique_key for new in new_jobs if new.unique_key is not None]
            if keys or unique_keys:
                holders = sa.or_(
                    jobs.c.idempotency_key.in_(keys),
                    sa.and_(jobs.c.unique_key.in_(unique_keys), jobs.c.state.notin_(_FINISHED)),
                )
                found = await conn.execute(sa.select(jobs).where(holders))
                existing = [_row_to_job(row) for row in found.mappings()]
            from conveyor.storage.postgres import JOBS_CHANNEL  # noqa: PLC0415 - a constant, no driver use

            await self._notify(conn, JOBS_CHANNEL, runnable_queues)
        if connection is None and runnable_queues:
            self._work_added.set()
        return self._inserted(new_jobs, stored, existing)

    @staticmethod
    def _inserted(new_jobs: Sequence[NewJob], stored: Sequence[Job], existing: Sequence[Job]) -> list[Job]:
        """Each new job as stored: itself, or the job already holding its idempotency or unique key."""
        by_idempotency = {job.idempotency_key: job for job in existing if job.idempotency_key}
        by_unique = {job.unique_key: job for job in existing if job.unique_key and not job.finished}
        return [
            by_idempotency.get(new.idempotency_key or "") or by_unique.get(new.unique_key or "") or job
            for new, job in zip(new_jobs, stored, strict=True)
        ]

    @_guarded
    async def insert_workflow(
        self, compiled: CompiledWorkflow, *, name: str | None, now: datetime, connection: Any = None
    ) -> Workflow:
        """Insert a workflow, its jobs and their dependencies in one transaction.

        ``connection``: an SQLAlchemy ``AsyncConnection`` or ``AsyncSession`` whose transaction
        it joins (a raw asyncpg connection is not supported here; wrap it in SQLAlchemy).
        """
        if isinstance(connection, AsyncSession):
            connection = await connection.connection()
        if connection is not None and not isinstance(connection, AsyncConnection):
            raise TypeError(
                f"enqueue_workflow(connection=...) takes an SQLAlchemy AsyncConnection or AsyncSession, "
                f"not {type(connection).__name__}"
            )
        stored = [_new_stored_job(new, now) for new in compiled.jobs]
        rows = [_new_row(job, new) for job, new in zip(stored, compiled.jobs, strict=True)]
        record = {
            "id": compiled.id,
            "name": name,
            "structure": compiled.structure,
            "output": compiled.output,
            "correlation_id": next((new.correlation_id for new in compiled.jobs if new.correlation_id), None),
            "created_at": _as_utc(now),
        }
        queues = sorted({job.queue for job in stored if job.state is JobState.QUEUED})
        async with self._writing(connection) as conn:
            await conn.execute(sa.insert(workflows), [record])
            await conn.execute(sa.insert(jobs), rows)
            await workflow_store.insert_edges(conn, compiled.edges)
            from conveyor.storage.postgres import JOBS_CHANNEL  # noqa: PLC0415 - a constant, no driver use

            await self._notify(conn, JOBS_CHANNEL, queues)
        if connection is None and queues:
            self._work_added.set()
        return _row_to_workflow(record, stored)

    @_guarded
    async def get_workflow(self, workflow_id: str) -> Workflow | None:
        async with self._read_engine.connect() as conn:
            record = (await conn.execute(sa.select(workflows).where(workflows.c.id == workflow_id))).mappings().first()
            if record is None:
                return None
            members = (await conn.execute(sa.select(jobs).where(jobs.c.workflow_id == workflow_id))).mappings().all()
        return _row_to_workflow(record, [_row_to_job(row) for row in members])

    async def wait_for_jobs(self, timeout: float) -> None:
        """Return when runnable jobs may have been added (here, or by any process), or after ``timeout``."""
        self._listen()
        self._watch_commits()
        # A timeout around the wait, not asyncio.wait_for: no task is made per wait (3.11 makes one).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._work_added.wait()
        self._work_added.clear()

    def wake_waiters(self) -> None:
        """End every ``wait_for_jobs`` now: the caller knows of news the store cannot hear of."""
        self._work_added.set()

    def stop_listening(self) -> None:
        """Stop hearing of other processes' enqueues until the next ``wait_for_jobs`` (PostgreSQL).

        For a worker whose sibling processes listen in its stead (see ``ListeningTurn``): each
        notification wakes every listening process and the server backend serving it.
        """
        if self._listener is not None:
            from conveyor.storage import postgres  # noqa: PLC0415 - PostgreSQL users only

            self._listener.remove(postgres.JOBS_CHANNEL)

    # -- the worker's cycle ---------------------------------------------------------------

    @_guarded
    async def fetch_jobs(
        self,
        *,
        queues: Sequence[str],
        limit: int,
        lease_owner: str,
        lease_seconds: float,
        now: datetime,
        limits: ClaimLimits | None = None,
    ) -> list[Job]:
        """Claim up to ``limit`` due jobs in claim order (priority, then due time, then age).

        ``limits``: queue and rate limits the claim must respect on behalf of every worker (see
        ``conveyor.storage.limits``); None keeps the claim to its single statement.
        """
        if limit <= 0:
            return []
        if (
            self.dialect == "sqlite"
            and tuple(queues) not in self._claimed_in_full
            and not await self._any_due(queues, now)
        ):
            # An idle SQLite worker polls often; a read costs little, the write lock would cost
            # more. After a full claim more work is likely: then the read would be wasted.
            return []
        lease_expires_at = now + timedelta(seconds=lease_seconds)
        if self.dialect == "postgresql" and limits is None:
            # One autocommit statement: the claim is atomic on its own, and skipping BEGIN and
            # COMMIT takes two round trips off every wake-up-to-start.
            from conveyor.storage import postgres  # noqa: PLC0415 - PostgreSQL users only

            async with self._driven() as driven:
                # In UTC, as every time read back is: the claimed jobs carry these two as they are.
                claimed = await postgres.claim_in_one_statement(
                    driven,
                    queues=queues,
                    limit=limit,
                    lease_owner=lease_owner,
                    lease_expires_at=_as_utc(lease_expires_at),
                    now=_as_utc(now),
                )
            claimed.sort(key=lambda job: (-job.priority, job.run_at, job.id))
            return claimed
        running = {
            "state": JobState.RUNNING.value,
            "attempt": jobs.c.attempt + 1,
            "lease_owner": lease_owner,
            "lease_expires_at": lease_expires_at,
            "attempted_at": now,
            "updated_at": now,
        }
        if limits is not None:
            return await self._fetch_limited(queues, limit, limits, running, now)
        # SQLite: the claim as plain SQL on the driver. SQLAlchemy's per-column result processing
        # of a whole job row costs several times what SQLite spends claiming it.
        assert self._write_lock is not None
        async with self._write_lock, self._engine.connect() as conn:
            rows = await dialects.sqlite_claim(
                (await conn.get_raw_connection()).driver_connection,
                queues,
                limit,
                lease_owner,
                _sqlite_text(lease_expires_at),
                _sqlite_text(now),
            )
        claimed = [_row_to_job(row) for row in rows]
        if len(claimed) == limit:
            self._claimed_in_full.add(tuple(queues))
        else:
            self._claimed_in_full.discard(tuple(queues))
        claimed.sort(key=lambda job: (-job.priority, job.run_at, job.id))
        return claimed

    async def _fetch_limited(
        self, queues: Sequence[str], limit: int, limits: ClaimLimits, running: dict[str, Any], now: datetime
    ) -> list[Job]:
        waker = self._limit_waker
        async with self._writing() as conn:
            claimed = await limited_claims.claim(
                conn,
                self.dialect,
                queues=queues,
                limit=limit,
                limits=limits,
                now=now,
                running_values=running,
                resting=waker.resting(now),
            )
        # Held up by a limit, the worker sleeps until room returns rather than asking again at once.
        waker.held_up(claimed, now)
        jobs_claimed = [_row_to_job(row) for row in claimed.rows]
        jobs_claimed.sort(key=lambda job: (-job.priority, job.run_at, job.id))
        return jobs_claimed

    @functools.cached_property
    def _limit_waker(self) -> limited_claims.Waker:
        waker = limited_claims.Waker(self._work_added.set)
        self.on_jobs_finished(waker.finished)
        return waker

    async def _any_due(self, queues: Sequence[str], now: datetime) -> bool:
        # Straight to the driver: through SQLAlchemy's cursor this read took about ten calls
        # into the connection's thread, and it stands between an idle worker's wake-up and its claim.
        async with self._read_engine.connect() as conn:
            driver = (await conn.get_raw_connection()).driver_connection
            return await dialects.sqlite_any_due(driver, queues, _sqlite_text(now))

    @_guarded
    async def heartbeat_jobs(self, leases: Mapping[str, str], *, lease_seconds: float, now: datetime) -> set[str]:
        """Extend the leases held (job id -> lease owner); return the ids still held."""
        if not leases:
            return set()
        extend = (
            sa.update(jobs)
            .where(
                # Found by id (a planner would scan the whole table for the pairs alone); each job
                # then under its own owner: one call carries several lease tokens.
                jobs.c.id.in_(list(leases)),
                sa.tuple_(jobs.c.id, jobs.c.lease_owner).in_(list(leases.items())),
                checked_state == JobState.RUNNING.value,
            )
            .values(lease_expires_at=now + timedelta(seconds=lease_seconds), updated_at=now)
            .returning(jobs.c.id, jobs.c.lease_owner)
        )
        async with self._writing() as conn:
            rows = (await conn.execute(extend)).all()
        return {job_id for job_id, owner in rows if leases.get(job_id) == owner}

    async def _apply_acks(
        self, conn: AsyncConnection, acks: Sequence[Ack], now: datetime
    ) -> tuple[set[str], workflow_store.Moved]:
        """Apply the acks; move their workflows on. Returns the ids that landed and what moved."""
        applied = await self._apply_acks_as_given(conn, acks, now)
        again = [ack.job_id for ack in acks if ack.job_id in applied and ack.state not in FINISHED_STATES]
        cancelled_instead: set[str] = set()
        if again:
            # An attempt that ended on its own after a user asked the job to stop does not run
            # again: the cancel wins over the retry (or the shutdown hand-back).
            stop = (
                sa.update(jobs)
                .where(jobs.c.id.in_(again), jobs.c.cancel_requested_at.is_not(None))
                .values(state=JobState.CANCELLED.value, finished_at=now, updated_at=now)
                .returning(jobs.c.id)
            )
            cancelled_instead = set((await conn.execute(stop)).scalars())
        moved = workflow_store.Moved(finished=set(cancelled_instead))
        steps = [ack for ack in acks if ack.workflow_id is not None and ack.job_id in applied]
        if steps:
            succeeded = [ack.job_id for ack in steps if ack.state is JobState.SUCCEEDED]
            failed = {
                ack.job_id: "ended dead" if ack.state is JobState.DEAD else "was cancelled"
                for ack in steps
                if ack.state in (JobState.DEAD, JobState.CANCELLED) or ack.job_id in cancelled_instead
            }
            released = await workflow_store.release_dependents(conn, self.dialect, succeeded, now)
            cancelled = await workflow_store.cancel_dependents(conn, failed, now)
            moved.queues |= released.queues
            moved.finished |= cancelled.finished
        return applied, moved

    async def _apply_acks_as_given(self, conn: AsyncConnection, acks: Sequence[Ack], now: datetime) -> set[str]:
        if self.dialect == "postgresql":
            return await self._apply_acks_at_once(conn, acks, now)
        batch = [
            {
                "id": ack.job_id,
                "owner": ack.lease_owner,
                "state": ack.state.value,
                "result": None if ack.result is None else dialects.dumps(ack.result),
                "error": dialects.dumps(ack.error) if ack.error else None,
                "run_at": _sqlite_time(ack.run_at),
                "finished_at": _sqlite_time(now) if ack.state in FINISHED_STATES else None,
                "delta": ack.attempt_delta,
                # As in dialects.postgres_ack_batch: the JSON writer turns the dataclasses into their to_json() objects.
                "entry": _json_text(ack.record),
            }
            for ack in acks
        ]
        rows = await conn.execute(dialects.SQLITE_BULK_ACK, {"batch": dialects.dumps(batch), "now": _sqlite_text(now)})
        return set(rows.scalars())

    async def _apply_acks_at_once(self, conn: AsyncConnection, acks: Sequence[Ack], now: datetime) -> set[str]:
        """Every ack of the batch in one statement: one round trip however large the batch."""
        batch = dialects.postgres_ack_batch(acks, now)
        rows = await conn.execute(dialects.POSTGRES_BULK_ACK, {"batch": batch, "now": now})
        return set(rows.scalars())

    @_guarded
    async def ack_jobs(self, acks: Sequence[Ack], *, now: datetime) -> set[str]:
        """Record how attempts ended, in one transaction; return the ids whose ack landed.

        An ack lands only if its job is still ``running`` under the ack's lease, so an ack
        that arrives after the job was rescued or cancelled changes nothing.
        """
        if not acks:
            return set()
        if self.dialect == "postgresql" and all(
            ack.state in FINISHED_STATES and ack.workflow_id is None for ack in acks
        ):
            # The common batch (jobs that finished, in no workflow) needs no follow-up statement:
            # the acks and their NOTIFY go in one autocommit statement, one round trip in all.
            from conveyor.storage import postgres  # noqa: PLC0415 - PostgreSQL users only

            async with self._driven() as driven:
                applied = await postgres.ack_in_one_statement(driven, acks, now)
            self._announce_finished(applied)
            return applied
        async with self._writing() as conn:
            applied, moved = await self._apply_acks(conn, acks, now)
            finished = ({ack.job_id for ack in acks if ack.state in FINISHED_STATES} & applied) | moved.finished
            await self._notify_moved(conn, finished, moved)
        self._announce_moved(finished, moved)
        return applied

    async def _notify_moved(self, conn: AsyncConnection, finished: set[str], moved: workflow_store.Moved) -> None:
        await self._notify_finished(conn, finished)
        if moved.queues:
            from conveyor.storage.postgres import JOBS_CHANNEL  # noqa: PLC0415 - a constant, no driver use

            await self._notify(conn, JOBS_CHANNEL, sorted(moved.queues))

    def _announce_moved(self, finished: set[str], moved: workflow_store.Moved) -> None:
        self._announce_finished(finished)
        if moved.queues:
            self._work_added.set()

    def on_jobs_finished(self, listener: Callable[[set[str]], None]) -> None:
        """Call ``listener`` with the ids of finished jobs: here at once, and (PostgreSQL) from any process."""
        self._finish_listeners.append(listener)
        self._listen(finished=True)

    def _jobs_notified(self, _queue: str) -> None:
        self._work_added.set()

    def _finished_notified(self, payload: str) -> None:
        self._announce_finished(set(payload.split(",")))

    def _announce_finished(self, job_ids: set[str]) -> None:
        if job_ids:
            for listener in self._finish_listeners:
                listener(job_ids)

    @_answered_at_once
    async def schema_revision(self) -> str | None:
        """The migration revision the database is at (a cheap round trip: readiness checks use it)."""
        from conveyor.storage import migrate  # noqa: PLC0415 - migrate imports this module's package

        return (await asyncio.wait_for(migrate.status(self._engine), 5)).current

    @_guarded
    async def finished_among(self, job_ids: Sequence[str]) -> set[str]:
        """Which of these jobs have finished: one query however many are asked about."""
        if not job_ids:
            return set()
        query = sa.select(jobs.c.id).where(jobs.c.id.in_(list(job_ids)), checked_state.in_(_FINISHED))
        async with self._read_engine.connect() as conn:
            return set((await conn.execute(query)).scalars())

    @_guarded
    async def rescue_jobs(self, *, now: datetime, limit: int = 1_000) -> list[Job]:
        """End attempts whose lease expired: the job retries, or is dead if out of attempts.

        Returns the jobs as they were found. Each expired lease is rescued once, however many
        workers race for it: the update is fenced like any other ack.
        """
        expired = (
            sa.select(jobs)
            .where(jobs.c.state == JobState.RUNNING.value, jobs.c.lease_expires_at < now)
            .order_by(jobs.c.lease_expires_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        async with self._writing() as conn:
            found = [_row_to_job(row) for row in (await conn.execute(expired)).mappings()]
            acks = [self._lost_ack(job, now) for job in found]
            applied, moved = await self._apply_acks(conn, acks, now)
            finished = ({ack.job_id for ack in acks if ack.state in FINISHED_STATES} & applied) | moved.finished
            await self._notify_moved(conn, finished, moved)
        self._announce_moved(finished, moved)
        return [job for job in found if job.id in applied]

    @staticmethod
    def _lost_ack(job: Job, now: datetime) -> Ack:
        error = JobError(
            type="LeaseExpired",
            message=(
                f"worker {job.lease_owner} stopped renewing its lease (it crashed, was killed, or hung); "
                f"attempt {job.attempt} counts as failed"
            ),
        )
        dead = job.attempt >= job.max_attempts
        return Ack(
            job_id=job.id,
            lease_owner=job.lease_owner or "",
            workflow_id=job.workflow_id,
            state=JobState.DEAD if dead else JobState.RETRYING,
            record=AttemptRecord(
                attempt=job.attempt,
                worker=job.lease_owner,
                started_at=job.attempted_at,
                ended_at=now,
                outcome=Outcome.LOST,
                error=error,
            ),
            error=error,
            run_at=None if dead else now,
        )

    @_guarded
    async def prune_jobs(self, *, finished_before: datetime, batch_size: int = 500) -> int:
        """Delete finished jobs older than the cutoff, in small transactions that hold no long lock."""
        total = 0
        sibling = jobs.alias("sibling")
        # A finished step of an unfinished workflow stays: a later step may still need its result.
        workflow_unfinished = (
            sa.select(sibling.c.id)
            .where(sibling.c.workflow_id == jobs.c.workflow_id, sibling.c.state.notin_(_FINISHED))
            .exists()
        )
        while True:
            batch = (
                sa.select(jobs.c.id, jobs.c.workflow_id)
                .where(jobs.c.finished_at.is_not(None), jobs.c.finished_at < finished_before)
                .where(jobs.c.state.in_(_FINISHED))
                .where(sa.or_(jobs.c.workflow_id.is_(None), ~workflow_unfinished))
                .limit(batch_size)
            )
            async with self._writing() as conn:
                found = (await conn.execute(batch)).all()
                ids = [job_id for job_id, _ in found]
                deleted = (await conn.execute(sa.delete(jobs).where(jobs.c.id.in_(ids)))).rowcount if ids else 0
                if any(workflow_id for _, workflow_id in found):
                    await workflow_store.forget(conn, ids, {workflow_id for _, workflow_id in found if workflow_id})
            total += deleted
            if len(found) < batch_size:
                return total

    # -- reading ------------------------------------------------------------------------

    @_guarded
    async def get_job(self, job_id: str) -> Job | None:
        return await self._reads.get(job_id)

    async def _read_jobs(self, job_ids: list[str]) -> dict[str, Job]:
        if self.dialect == "postgresql":
            # Straight to the driver: clients poll jobs, and SQLAlchemy's statement and row
            # processing cost several times the query itself.
            from conveyor.storage import postgres  # noqa: PLC0415 - PostgreSQL users only

            async with self._driven() as driven:
                rows = await postgres.get_in_one_statement(driven, job_ids)
        else:
            async with self._read_engine.connect() as conn:
                rows = await dialects.sqlite_get_jobs((await conn.get_raw_connection()).driver_connection, job_ids)
        return {row["id"]: _row_to_job(row) for row in rows}

    @_guarded
    async def find_idempotency_keys(self, keys: Sequence[str]) -> dict[str, str]:
        """Which of these idempotency keys stored jobs hold, each with its job's id (one indexed query)."""
        if not keys:
            return {}
        query = sa.select(jobs.c.idempotency_key, jobs.c.id).where(jobs.c.idempotency_key.in_(list(keys)))
        async with self._read_engine.connect() as conn:
            return dict((await conn.execute(query)).all())

    @_guarded
    async def last_idempotency_key(self, prefix: str, *, length: int) -> str | None:
        """The greatest stored idempotency key that starts with ``prefix`` and is ``length`` long.

        For keys that end in a fixed-width timestamp, the latest one. No index serves a prefix
        under every PostgreSQL collation, so this may read the whole table: it is for rare use.
        """
        key = jobs.c.idempotency_key
        query = sa.select(sa.func.max(key)).where(
            sa.func.substr(key, 1, len(prefix)) == prefix, sa.func.length(key) == length
        )
        async with self._read_engine.connect() as conn:
            return (await conn.execute(query)).scalar()

    @_guarded
    async def list_jobs(self, job_filter: JobFilter, *, cursor: str | None = None, limit: int = 50) -> Page:
        """Newest first. The cursor is the last id seen, so pages stay stable as jobs are added."""
        query = sa.select(jobs).order_by(jobs.c.id.desc()).limit(limit + 1)
        if job_filter.states:
            states = [state.value for state in job_filter.states]
            # One state as an equality: SQLite uses a partial index (see schema.py) only for a query
            # that states one of its predicate's terms, and ``state IN ('dead')`` is not one to it.
            in_states = jobs.c.state == states[0] if len(states) == 1 else jobs.c.state.in_(states)
            query = query.where(in_states)
        if job_filter.queue is not None:
            query = query.where(jobs.c.queue == job_filter.queue)
        if job_filter.task is not None:
            query = query.where(jobs.c.task == job_filter.task)
        if job_filter.created_after is not None:
            query = query.where(jobs.c.created_at >= job_filter.created_after)
        if job_filter.created_before is not None:
            query = query.where(jobs.c.created_at < job_filter.created_before)
        if cursor is not None:
            query = query.where(jobs.c.id < cursor)
        async with self._read_engine.connect() as conn:
            found = [_row_to_job(row) for row in (await conn.execute(query)).mappings()]
        more = len(found) > limit
        page = found[:limit]
        return Page(jobs=page, next_cursor=page[-1].id if more and page else None)

    @_guarded
    async def queue_stats(self) -> list[QueueStats]:
        counts = sa.select(jobs.c.queue, jobs.c.state, sa.func.count()).group_by(jobs.c.queue, jobs.c.state)
        oldest = sa.select(jobs.c.queue, sa.func.min(jobs.c.run_at)).where(IS_RUNNABLE).group_by(jobs.c.queue)
        async with self._read_engine.connect() as conn:
            count_rows = (await conn.execute(counts)).all()
            oldest_rows = (await conn.execute(oldest)).all()
        by_queue: dict[str, dict[JobState, int]] = {}
        for queue, state, count in count_rows:
            by_queue.setdefault(queue, {})[JobState(state)] = count
        oldest_by_queue = {
            queue: UTCDateTime().process_result_value(value, self._engine.dialect) for queue, value in oldest_rows
        }
        return [
            QueueStats(queue=queue, counts=by_queue[queue], oldest_runnable_at=oldest_by_queue.get(queue))
            for queue in sorted(by_queue)
        ]

    # -- operator actions -----------------------------------------------------------------

    async def _transition(
        self,
        job_id: str,
        from_states: Sequence[JobState],
        values: dict[str, Any],
        operation: str,
        allowed: Sequence[JobState] | None = None,
    ) -> Job:
        change = (
            sa.update(jobs)
            .where(jobs.c.id == job_id, checked_state.in_([state.value for state in from_states]))
            .values(**values)
            .returning(*jobs.c)
        )
        moved = workflow_store.Moved()
        async with self._writing() as conn:
            row = (await conn.execute(change)).mappings().first()
            state = None
            if row is None:
                state = (await conn.execute(sa.select(jobs.c.state).where(jobs.c.id == job_id))).scalar()
            else:
                moved = await self._move_workflow_after(conn, row, now=values["updated_at"])
                if row["workflow_id"] is not None:
                    # Moving the workflow may have changed the row itself (a replayed step that waits).
                    row = (await conn.execute(sa.select(jobs).where(jobs.c.id == job_id))).mappings().first()
                    assert row is not None
                if row["state"] == JobState.QUEUED.value:
                    moved.queues.add(row["queue"])
                if row["state"] in _FINISHED:
                    moved.finished.add(job_id)
                await self._notify_moved(conn, moved.finished, moved)
        if row is not None:
            self._announce_moved(moved.finished, moved)
            return _row_to_job(row)
        if state is None:
            raise JobNotFoundError(job_id)
        raise JobStateError(job_id, state, operation, [state.value for state in allowed or from_states])

    async def _move_workflow_after(
        self, conn: AsyncConnection, row: Mapping[str, Any], *, now: datetime
    ) -> workflow_store.Moved:
        """An operator changed a workflow step: cancel what waits on it, or (replayed) restore it."""
        if row["workflow_id"] is None:
            return workflow_store.Moved()
        if row["state"] == JobState.CANCELLED.value:
            return await workflow_store.cancel_dependents(conn, {row["id"]: "was cancelled"}, now)
        if row["state"] == JobState.QUEUED.value:
            return await workflow_store.replay_step(conn, row["id"], now)
        return workflow_store.Moved()

    @_guarded
    async def cancel_job(self, job_id: str, *, now: datetime) -> Job:
        """Cancel a job: one not started yet is cancelled at once; a running one is asked to stop.

        A running job stays ``running`` with ``cancel_requested_at`` set until its worker stops
        the attempt and records it ``cancelled``.
        """
        request = (
            sa.update(jobs)
            .where(jobs.c.id == job_id, checked_state == JobState.RUNNING.value)
            .values(cancel_requested_at=sa.func.coalesce(jobs.c.cancel_requested_at, now), updated_at=now)
            .returning(*jobs.c)
        )
        async with self._writing() as conn:
            row = (await conn.execute(request)).mappings().first()
        if row is not None:
            return _row_to_job(row)
        return await self._transition(
            job_id,
            CANCELLABLE_STATES,
            {"state": JobState.CANCELLED.value, "finished_at": now, "updated_at": now},
            "cancel",
            allowed=(*CANCELLABLE_STATES, JobState.RUNNING),
        )

    @_guarded
    async def record_progress(self, reports: Mapping[str, tuple[str, dict[str, Any]]], *, now: datetime) -> None:
        """Store progress (job id -> (lease owner, report)) for jobs still running under that lease."""
        if not reports:
            return
        change = (
            sa.update(jobs)
            .where(
                jobs.c.id == sa.bindparam("b_id"),
                checked_state == JobState.RUNNING.value,
                jobs.c.lease_owner == sa.bindparam("b_owner"),
            )
            .values(progress=sa.bindparam("b_progress", type_=JSONType), updated_at=now)
        )
        rows = [{"b_id": job_id, "b_owner": owner, "b_progress": report} for job_id, (owner, report) in reports.items()]
        async with self._writing() as conn:
            await conn.execute(change, rows)

    @_guarded
    async def cancel_requested_among(self, job_ids: Sequence[str]) -> set[str]:
        """Which of these running jobs a user asked to stop (one query for a worker's whole set)."""
        if not job_ids:
            return set()
        query = sa.select(jobs.c.id).where(
            jobs.c.id.in_(list(job_ids)),
            checked_state == JobState.RUNNING.value,
            jobs.c.cancel_requested_at.is_not(None),
        )
        async with self._read_engine.connect() as conn:
            return set((await conn.execute(query)).scalars())

    @_guarded
    async def retry_job(self, job_id: str, *, now: datetime) -> Job:
        """Queue a dead or cancelled job again with its full number of attempts (a DLQ replay).

        A workflow step cancelled because a job it waits for failed can't run before that job
        succeeds: replaying the failed job is what resumes it, so it is refused here.
        """
        async with self._read_engine.connect() as conn:
            found = (await conn.execute(sa.select(jobs.c.state, jobs.c.error).where(jobs.c.id == job_id))).first()
        if found is not None and (found.error or {}).get("type") == workflow_store.DEPENDENCY_FAILED:
            raise JobStateError(
                job_id,
                found.state,
                "retry",
                [state.value for state in REPLAYABLE_STATES],
                reason=f"it waits for another job of its workflow that failed ({found.error['message']})",
            )
        return await self._transition(
            job_id,
            REPLAYABLE_STATES,
            {
                "state": JobState.QUEUED.value,
                "attempt": 0,
                "run_at": now,
                "finished_at": None,
                "cancel_requested_at": None,
                "updated_at": now,
            },
            "retry",
        )

    # -- API tokens -----------------------------------------------------------------------

    @_guarded
    async def insert_token(self, token: TokenRecord) -> None:
        row = {
            "id": token.id,
            "name": token.name,
            "secret_hash": token.secret_hash,
            "scopes": list(token.scopes),
            "created_at": token.created_at,
            "revoked_at": token.revoked_at,
        }
        async with self._writing() as conn:
            await conn.execute(sa.insert(tokens), [row])

    @_guarded
    async def get_token(self, token_id: str) -> TokenRecord | None:
        async with self._read_engine.connect() as conn:
            row = (await conn.execute(sa.select(tokens).where(tokens.c.id == token_id))).mappings().first()
        return _row_to_token(row) if row else None

    @_guarded
    async def list_tokens(self) -> list[TokenRecord]:
        async with self._read_engine.connect() as conn:
            rows = (await conn.execute(sa.select(tokens).order_by(tokens.c.created_at))).mappings().all()
        return [_row_to_token(row) for row in rows]

    @_guarded
    async def count_tokens(self) -> int:
        """Every token ever created, revoked ones too: once a server needed tokens, it always does."""
        query = sa.select(sa.func.count()).select_from(tokens)
        async with self._read_engine.connect() as conn:
            return int((await conn.execute(query)).scalar_one())

    @_guarded
    async def revoke_token(self, token_id: str, *, now: datetime) -> bool:
        """Revoke a token; False if no active token has that id."""
        change = sa.update(tokens).where(tokens.c.id == token_id, tokens.c.revoked_at.is_(None)).values(revoked_at=now)
        async with self._writing() as conn:
            return bool((await conn.execute(change)).rowcount)


def _row_to_workflow(record: Mapping[str, Any], members: Sequence[Job]) -> Workflow:
    return Workflow(
        id=record["id"],
        name=record["name"],
        structure=record["structure"],
        output=record["output"],
        created_at=record["created_at"],
        correlation_id=record["correlation_id"],
        jobs=order_jobs(record["structure"], members),
    )


def _row_to_token(row: Mapping[str, Any]) -> TokenRecord:
    return TokenRecord(
        id=row["id"],
        name=row["name"],
        secret_hash=row["secret_hash"],
        scopes=tuple(row["scopes"]),
        created_at=row["created_at"],
        revoked_at=row["revoked_at"],
    )
