"""The tables, as SQLAlchemy Core: the single source of truth the migrations are checked against."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement

from conveyor.jobs import FINISHED_STATES, RUNNABLE_STATES, JobState

VERSION_TABLE = "conveyor_alembic_version"
"""Conveyor's own Alembic version table, so its migrations never meet the application's own Alembic."""

SCHEMA_REVISION = "0010"
"""The newest migration (``conveyor/migrations/versions``), whose schema these tables describe.

A starting process that finds the database at this revision needs nothing from Alembic, whose
import and migration scripts cost a quarter of a second of every worker's start; a test holds
this to Alembic's head."""


class UTCDateTime(sa.TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend.

    SQLite keeps no zone, so values are stored as naive UTC text (which sorts correctly)
    and come back aware; PostgreSQL gets ``timestamptz``.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: Conveyor stores UTC-aware datetimes only")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:  # noqa: ARG002 - SQLAlchemy's signature
        if value is None:
            return None
        if isinstance(value, str):
            value = datetime.fromisoformat(value)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class SQLiteJSON(sqlite.JSON):
    """JSON kept in a TEXT column.

    A column declared ``JSON`` has NUMERIC affinity in SQLite, which turns the JSON text
    ``5`` into the number 5 (and a big integer into a lossy float); TEXT keeps it as written.
    """


@compiles(SQLiteJSON, "sqlite")
def _render_sqlite_json(_type: SQLiteJSON, _compiler: Any, **_kw: Any) -> str:
    return "TEXT"


# Python None is stored as SQL NULL, not the JSON text "null".
JSONType = (
    sa.JSON(none_as_null=True)
    .with_variant(SQLiteJSON(none_as_null=True), "sqlite")
    .with_variant(postgresql.JSONB(none_as_null=True), "postgresql")
)

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "pk": "pk_%(table_name)s",
    }
)

_runnable = [state.value for state in RUNNABLE_STATES]

jobs = sa.Table(
    "conveyor_jobs",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("task", sa.String(255), nullable=False),
    sa.Column("queue", sa.String(255), nullable=False),
    sa.Column("priority", sa.Integer, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("args", JSONType, nullable=False),
    sa.Column("kwargs", JSONType, nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("max_attempts", sa.Integer, nullable=False),
    sa.Column("timeout_seconds", sa.Float, nullable=True),
    sa.Column("run_at", UTCDateTime, nullable=False),
    sa.Column("lease_owner", sa.String(255), nullable=True),
    sa.Column("lease_expires_at", UTCDateTime, nullable=True),
    sa.Column("attempted_at", UTCDateTime, nullable=True),
    sa.Column("finished_at", UTCDateTime, nullable=True),
    sa.Column("cancel_requested_at", UTCDateTime, nullable=True),
    sa.Column("progress", JSONType, nullable=True),
    sa.Column("result", JSONType, nullable=True),
    sa.Column("error", JSONType, nullable=True),
    sa.Column("history", JSONType, nullable=False),
    sa.Column("idempotency_key", sa.String(255), nullable=True),
    # A digest of the request that used the idempotency key, to tell a replay from a misuse.
    sa.Column("request_digest", sa.String(64), nullable=True),
    sa.Column("unique_key", sa.String(255), nullable=True),
    sa.Column("trace_context", JSONType, nullable=True),
    sa.Column("correlation_id", sa.String(255), nullable=True),
    # Room for workflows: a job may belong to one and hang below a parent job.
    sa.Column("workflow_id", sa.String(36), nullable=True),
    sa.Column("parent_id", sa.String(36), nullable=True),
    # A waiting workflow step: how many dependencies have yet to succeed, and how its first
    # argument is built from their results (see conveyor.workflows).
    sa.Column("waiting_on", sa.Integer, nullable=False, server_default="0"),
    sa.Column("input_template", JSONType, nullable=True),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.CheckConstraint("state IN (" + ", ".join(f"'{state.value}'" for state in JobState) + ")", name="state"),
    sa.CheckConstraint("attempt >= 0 AND max_attempts >= 1", name="attempts"),
)

# A job waiting its turn, in the words of the runnable index's predicate: the states are written out
# as literals, since a planner (SQLite's, always) uses a partial index only for a query that
# states the predicate itself, and a bound parameter could hold anything.
IS_RUNNABLE = jobs.c.state.in_(sa.bindparam("runnable_states", _runnable, expanding=True, literal_execute=True))


class _NoIndex(FunctionElement[str]):
    """A column as written so that no index can answer a comparison with it (see ``checked_state``)."""

    inherit_cache = True
    type = sa.String()


@compiles(_NoIndex)
def _render_no_index(element: _NoIndex, compiler: Any, **kw: Any) -> str:
    return compiler.process(element.clauses, **kw)


@compiles(_NoIndex, "postgresql")
def _render_no_index_postgresql(element: _NoIndex, compiler: Any, **kw: Any) -> str:
    # No index has this collation; for equality it changes nothing (the same bytes either way).
    return f'({compiler.process(element.clauses, **kw)} COLLATE "C")'


@compiles(_NoIndex, "sqlite")
def _render_no_index_sqlite(element: _NoIndex, compiler: Any, **kw: Any) -> str:
    # SQLite's documented way to keep a term off every index: a unary plus, which changes no value.
    return f"+{compiler.process(element.clauses, **kw)}"


# A job's state as a check on rows found by id, never as the way to find them. Planners pick an
# index on state for `id = ... AND state = 'running'` when their statistics say few jobs run (as
# they do after any quiet spell), and then read every running job for each one they look up:
# an ack batch, a heartbeat or a progress write would cost as much as the jobs running anywhere.
checked_state = _NoIndex(jobs.c.state)

# The claim query walks this partial index in claim order and touches nothing else.
sa.Index(
    "ix_conveyor_jobs_runnable",
    jobs.c.queue,
    jobs.c.priority.desc(),
    jobs.c.run_at,
    jobs.c.id,
    sqlite_where=jobs.c.state.in_(_runnable),
    postgresql_where=jobs.c.state.in_(_runnable),
)
sa.Index(
    "ix_conveyor_jobs_leases",
    jobs.c.lease_expires_at,
    sqlite_where=jobs.c.state == JobState.RUNNING.value,
    postgresql_where=jobs.c.state == JobState.RUNNING.value,
)
sa.Index(
    "ix_conveyor_jobs_finished",
    jobs.c.finished_at,
    sqlite_where=jobs.c.finished_at.is_not(None),
    postgresql_where=jobs.c.finished_at.is_not(None),
)
# Jobs set aside from the way every job takes (queued, running, succeeded), newest first by state:
# the dead-letter queue above all. An index of every job's state took a new entry at each change
# of state, three per job: 12 % of the WAL of a job's claim and outcome on PostgreSQL.
# The predicate is ORed equalities: SQLite uses a partial index only for a query that states one of
# its terms, as a listing of one state does (``state = 'dead'``; see ``SqlStore.list_jobs``).
SET_ASIDE_STATES = (JobState.DEAD, JobState.CANCELLED, JobState.WAITING)
_set_aside = sa.or_(*(jobs.c.state == state.value for state in SET_ASIDE_STATES))
sa.Index(
    "ix_conveyor_jobs_set_aside",
    jobs.c.state,
    jobs.c.id,
    sqlite_where=_set_aside,
    postgresql_where=_set_aside,
)
# One unfinished job per unique key: a second enqueue while the first has not finished gets it back.
_unfinished = [state.value for state in JobState if state not in FINISHED_STATES]
sa.Index(
    "uq_conveyor_jobs_unique_key_unfinished",
    jobs.c.unique_key,
    unique=True,
    sqlite_where=sa.and_(jobs.c.unique_key.is_not(None), jobs.c.state.in_(_unfinished)),
    postgresql_where=sa.and_(jobs.c.unique_key.is_not(None), jobs.c.state.in_(_unfinished)),
)
# A repeated idempotency key finds the first job; jobs without one take no entry.
sa.Index(
    "uq_conveyor_jobs_idempotency_key",
    jobs.c.idempotency_key,
    unique=True,
    sqlite_where=jobs.c.idempotency_key.is_not(None),
    postgresql_where=jobs.c.idempotency_key.is_not(None),
)
# Only jobs in a workflow: a NULL entry per plain job would be written on every change of it.
sa.Index(
    "ix_conveyor_jobs_workflow_id",
    jobs.c.workflow_id,
    sqlite_where=jobs.c.workflow_id.is_not(None),
    postgresql_where=jobs.c.workflow_id.is_not(None),
)

workflows = sa.Table(
    "conveyor_workflows",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("name", sa.String(255), nullable=True),
    # The workflow's tree with each step's job id, and the template of its result.
    sa.Column("structure", JSONType, nullable=False),
    sa.Column("output", JSONType, nullable=False),
    sa.Column("correlation_id", sa.String(255), nullable=True),
    sa.Column("created_at", UTCDateTime, nullable=False),
)
sa.Index("ix_conveyor_workflows_created_at", workflows.c.created_at)

# An edge per (job, job it waits for): found from the finished job at ack time, both ways on replay.
job_dependencies = sa.Table(
    "conveyor_job_dependencies",
    metadata,
    sa.Column("dependency_id", sa.String(36), primary_key=True),
    sa.Column("dependent_id", sa.String(36), primary_key=True),
)
sa.Index("ix_conveyor_job_dependencies_dependent_id", job_dependencies.c.dependent_id)

# A row per rate-limited task: its recent starts, read and written under the row's lock by the
# claim that spends them (see conveyor.limits.StartWindow).
rate_limits = sa.Table(
    "conveyor_rate_limits",
    metadata,
    sa.Column("task", sa.String(255), primary_key=True),
    sa.Column("starts", JSONType, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
)

tokens = sa.Table(
    "conveyor_tokens",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("name", sa.String(255), nullable=False),
    sa.Column("secret_hash", sa.String(64), nullable=False),
    sa.Column("scopes", JSONType, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("revoked_at", UTCDateTime, nullable=True),
)
