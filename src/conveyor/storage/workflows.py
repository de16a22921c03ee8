"""Moving workflows on, inside the transaction that finished the job (see ``conveyor.workflows``).

Each function runs on the caller's open connection, so a workflow advances exactly when the
job's ack commits, and not at all if it rolls back.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from conveyor.jobs import JobError, JobState
from conveyor.storage.schema import checked_state, job_dependencies, jobs, workflows
from conveyor.workflows import DEPENDENCY_FAILED, resolve, template_job_ids

# Well under SQLite's limit on bound parameters in one statement.
_CHUNK = 5_000


@dataclass(slots=True)
class Moved:
    """What advancing changed: the queues that got work, and the jobs that finished."""

    queues: set[str] = field(default_factory=set)
    finished: set[str] = field(default_factory=set)


def _chunks(values: Sequence[str]) -> Iterable[Sequence[str]]:
    for start in range(0, len(values), _CHUNK):
        yield values[start : start + _CHUNK]


async def release_dependents(conn: AsyncConnection, dialect: str, succeeded: Sequence[str], now: datetime) -> Moved:
    """The jobs in ``succeeded`` succeeded: count them off their dependents; queue those now free."""
    moved = Moved()
    if not succeeded:
        return moved
    counts: dict[str, int] = {}
    for chunk in _chunks(list(succeeded)):
        query = (
            sa.select(job_dependencies.c.dependent_id, sa.func.count())
            .where(job_dependencies.c.dependency_id.in_(chunk))
            .group_by(job_dependencies.c.dependent_id)
        )
        for dependent, count in (await conn.execute(query)).all():
            counts[dependent] = counts.get(dependent, 0) + count
    if not counts:
        return moved
    ordered = sorted(counts)
    if dialect == "postgresql":
        # Lock the dependents in one order: two acks releasing overlapping dependents (a group
        # after a group) then queue up behind each other instead of deadlocking.
        await conn.execute(sa.select(jobs.c.id).where(jobs.c.id.in_(ordered)).order_by(jobs.c.id).with_for_update())
    decrement = (
        sa.update(jobs)
        .where(jobs.c.id == sa.bindparam("b_id"), checked_state == JobState.WAITING.value)
        .values(waiting_on=jobs.c.waiting_on - sa.bindparam("b_count", type_=sa.Integer), updated_at=now)
    )
    await conn.execute(decrement, [{"b_id": job_id, "b_count": counts[job_id]} for job_id in ordered])
    return await _start_ready(conn, ordered, now)


async def _start_ready(conn: AsyncConnection, candidates: Sequence[str], now: datetime) -> Moved:
    """Queue the candidates that wait on nothing more, each with its input put in front of its args."""
    moved = Moved()
    ready_query = sa.select(jobs.c.id, jobs.c.queue, jobs.c.args, jobs.c.run_at, jobs.c.input_template).where(
        jobs.c.id.in_(candidates), checked_state == JobState.WAITING.value, jobs.c.waiting_on <= 0
    )
    ready = (await conn.execute(ready_query)).mappings().all()
    if not ready:
        return moved
    needed = sorted({job_id for row in ready for job_id in template_job_ids(row["input_template"] or [])})
    results: dict[str, Any] = {}
    for chunk in _chunks(needed):
        rows = await conn.execute(sa.select(jobs.c.id, jobs.c.result).where(jobs.c.id.in_(chunk)))
        results.update(dict(rows.all()))
    start = (
        sa.update(jobs)
        .where(jobs.c.id == sa.bindparam("b_id"), checked_state == JobState.WAITING.value)
        .values(
            state=sa.bindparam("b_state"),
            args=sa.bindparam("b_args", type_=jobs.c.args.type),
            # Consumed: a replay of this step later runs it with the same input, not a second one.
            input_template=None,
            waiting_on=0,
            updated_at=now,
        )
    )
    updates = []
    for row in ready:
        template = row["input_template"]
        args = row["args"] if template is None else [resolve(template, results), *row["args"]]
        due = row["run_at"] > now
        updates.append(
            {
                "b_id": row["id"],
                "b_state": (JobState.SCHEDULED if due else JobState.QUEUED).value,
                "b_args": args,
            }
        )
        if not due:
            moved.queues.add(row["queue"])
    await conn.execute(start, updates)
    return moved


async def replay_step(conn: AsyncConnection, job_id: str, now: datetime) -> Moved:
    """A workflow step was queued again by a replay: make it wait for what it still needs.

    A step cancelled before it started has not received its input yet: it waits for its
    unfinished dependencies, or (all succeeded) gets its input now. Then every step cancelled
    because of it waits again too.
    """
    template = (await conn.execute(sa.select(jobs.c.input_template).where(jobs.c.id == job_id))).scalar()
    pending = (await conn.execute(sa.select(_pending_dependencies(job_id)))).scalar() or 0
    moved = Moved()
    if pending or template is not None:
        await conn.execute(
            sa.update(jobs).where(jobs.c.id == job_id).values(state=JobState.WAITING.value, waiting_on=pending)
        )
        moved = await _start_ready(conn, [job_id], now)
    await restore_dependents(conn, job_id, now)
    return moved


def _pending_dependencies(job_id: str) -> Any:
    """How many of the job's dependencies have not succeeded (a scalar subquery)."""
    # Aliased, so the count reads the dependencies' rows, not a row being updated.
    dependency_jobs = jobs.alias("dependency_jobs")
    return (
        sa.select(sa.func.count())
        .select_from(job_dependencies.join(dependency_jobs, dependency_jobs.c.id == job_dependencies.c.dependency_id))
        .where(job_dependencies.c.dependent_id == job_id, dependency_jobs.c.state != JobState.SUCCEEDED.value)
        .scalar_subquery()
    )


async def cancel_dependents(conn: AsyncConnection, failed: Mapping[str, str], now: datetime) -> Moved:
    """Jobs in ``failed`` (id -> how it ended) won't succeed: cancel every step waiting on them.

    Walks down the dependency edges level by level; each edge is read once.
    """
    moved = Moved()
    for root, how in sorted(failed.items()):
        error = JobError(DEPENDENCY_FAILED, f"job {root} {how}; replay it to resume this workflow").to_json()
        frontier = [root]
        while frontier:
            dependents: set[str] = set()
            for chunk in _chunks(frontier):
                query = sa.select(job_dependencies.c.dependent_id).where(job_dependencies.c.dependency_id.in_(chunk))
                dependents.update((await conn.execute(query)).scalars())
            if not dependents:
                break
            cancel = (
                sa.update(jobs)
                .where(jobs.c.id.in_(sorted(dependents)), checked_state == JobState.WAITING.value)
                .values(
                    state=JobState.CANCELLED.value,
                    error=error,
                    finished_at=now,
                    updated_at=now,
                )
                .returning(jobs.c.id)
            )
            frontier = list((await conn.execute(cancel)).scalars())
            moved.finished.update(frontier)
    return moved


async def restore_dependents(conn: AsyncConnection, replayed: str, now: datetime) -> None:
    """``replayed`` runs again: steps cancelled because of it wait again, for what is still unfinished."""
    frontier = [replayed]
    while frontier:
        query = (
            sa.select(jobs.c.id, jobs.c.error)
            .join(job_dependencies, job_dependencies.c.dependent_id == jobs.c.id)
            .where(job_dependencies.c.dependency_id.in_(frontier), checked_state == JobState.CANCELLED.value)
        )
        candidates = sorted(
            {
                job_id
                for job_id, error in (await conn.execute(query)).all()
                if (error or {}).get("type") == DEPENDENCY_FAILED
            }
        )
        for job_id in candidates:
            await conn.execute(
                sa.update(jobs)
                .where(jobs.c.id == job_id)
                .values(
                    state=JobState.WAITING.value,
                    waiting_on=_pending_dependencies(job_id),
                    error=None,
                    finished_at=None,
                    updated_at=now,
                )
            )
        frontier = candidates


async def insert_edges(conn: AsyncConnection, edges: Sequence[tuple[str, str]]) -> None:
    if edges:
        await conn.execute(
            sa.insert(job_dependencies),
            [{"dependency_id": dependency, "dependent_id": dependent} for dependency, dependent in edges],
        )


async def forget(conn: AsyncConnection, job_ids: Sequence[str], workflow_ids: set[str]) -> None:
    """Pruned jobs take their edges with them, and a workflow with no job left goes too."""
    for chunk in _chunks(list(job_ids)):
        await conn.execute(
            sa.delete(job_dependencies).where(
                sa.or_(job_dependencies.c.dependency_id.in_(chunk), job_dependencies.c.dependent_id.in_(chunk))
            )
        )
    left = set(
        (await conn.execute(sa.select(jobs.c.workflow_id).where(jobs.c.workflow_id.in_(workflow_ids)))).scalars()
    )
    gone = sorted(workflow_ids - left)
    if gone:
        await conn.execute(sa.delete(workflows).where(workflows.c.id.in_(gone)))
