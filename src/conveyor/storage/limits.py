"""The claim under limits: per-queue concurrency and per-task rate limits, held across workers.

``SqlStore.fetch_jobs`` comes here only when the worker has limits to respect; without any,
its single-statement claim runs as before. Here, in the claim's one transaction:

1. Candidates: due jobs in claim order, locked ``FOR UPDATE SKIP LOCKED`` as in the plain claim.
2. Limited queues among them: claimers of such a queue take turns on a transaction-level
   advisory lock per queue (PostgreSQL; on SQLite ``BEGIN IMMEDIATE`` already lets one writer
   in at a time), then count its running jobs. Counting under the lock is what makes the limit
   hold: no two claimers can both see the same free room.
3. Rate-limited tasks among them: their rows in ``conveyor_rate_limits``, locked ``FOR UPDATE``.
4. A walk through the candidates in order, taking each job whose queue and task have room left.
   A job without room stays as it was (queued, no attempt spent); the ones behind it still run.
5. The taken jobs become ``running``; each task's row records its new starts.

Locks are always taken in one order (candidate rows, which are never waited for; queue locks by
key; rate rows by task name), so claimers queue behind each other but never deadlock. When jobs
were held back and the batch is not full, the walk looks further down the queue, past queues and
tasks that have no room left and those it holds no lock for, so the lock order stays as it was.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from conveyor.jobs import JobState
from conveyor.limits import ClaimLimits, StartWindow
from conveyor.storage import dialects
from conveyor.storage.schema import IS_RUNNABLE, JSONType, jobs, rate_limits

# Locks in array order: the caller passes the keys sorted, so every claimer queues the same way.
_LOCK_QUEUES = sa.text("SELECT pg_advisory_xact_lock(key) FROM unnest(CAST(:keys AS bigint[])) AS key")

_MIN_WAKE_SECONDS = 0.001
"""A timer due at once would wake a worker that then finds the same lack of room: never less."""


def queue_lock_key(queue: str) -> int:
    """The advisory lock of one limited queue: a stable 64-bit hash, the same in every process."""
    digest = hashlib.blake2b(f"conveyor.queue_limit:{queue}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


@dataclass(slots=True)
class LimitedClaim:
    rows: list[Mapping[str, Any]] = field(default_factory=list)
    """The claimed jobs, as updated."""
    waiting_on: set[str] = field(default_factory=set)
    """Running jobs of queues that were full while jobs waited: one of them finishing makes room."""
    room_returns_at: datetime | None = None
    """When the first task that ran out of allowance while jobs waited may start one again."""
    resting: dict[str, datetime] = field(default_factory=dict)
    """Tasks left without allowance, each with when it returns: until then no claim can start one."""


async def claim(
    conn: AsyncConnection,
    dialect: str,
    *,
    queues: Sequence[str],
    limit: int,
    limits: ClaimLimits,
    now: datetime,
    running_values: Mapping[str, Any],
    resting: Sequence[str] = (),
) -> LimitedClaim:
    """Claim up to ``limit`` due jobs of ``queues`` that their queue's and task's limits allow.

    ``resting``: rate-limited tasks known to have no allowance yet, passed over without a look
    at (or a lock on) their rows.
    """
    queue_room: dict[str, int] = {}
    windows: dict[str, StartWindow] = {}
    task_room: dict[str, int] = {}
    full_queues: set[str] = set()
    out_of_allowance: set[str] = set()
    claimed = LimitedClaim()
    locked = False
    while len(claimed.rows) < limit:
        wanted = limit - len(claimed.rows)
        # After the first look, only limited queues and tasks already locked (with room) qualify.
        open_queues = [
            queue for queue in queues if queue not in limits.queues or not locked or queue_room.get(queue, 0) > 0
        ]
        shut_tasks = [task for task in limits.rates if task in resting or (locked and task_room.get(task, 0) == 0)]
        if not open_queues:
            break
        found = (await conn.execute(_candidates(open_queues, shut_tasks, wanted, now))).all()
        if not locked:
            present_queues = sorted({row.queue for row in found} & limits.queues.keys())
            present_tasks = sorted({row.task for row in found} & limits.rates.keys())
            queue_room = await _queue_room(conn, dialect, present_queues, limits)
            windows = await _lock_windows(conn, dialect, present_tasks, limits, now)
            task_room = {task: window.room for task, window in windows.items()}
            locked = True
        taken = []
        for row in found:
            if queue_room.get(row.queue) == 0:
                full_queues.add(row.queue)
            elif task_room.get(row.task) == 0:
                out_of_allowance.add(row.task)
            else:
                taken.append(row.id)
                if row.queue in queue_room:
                    queue_room[row.queue] -= 1
                if row.task in task_room:
                    task_room[row.task] -= 1
        if taken:
            update = sa.update(jobs).where(jobs.c.id.in_(taken)).values(**running_values).returning(*jobs.c)
            claimed.rows += (await conn.execute(update)).mappings().all()
        if len(found) < wanted or len(taken) == len(found):
            break
    await _record_starts(conn, windows, task_room, now)
    if full_queues:
        # Only a claim held up by a full queue reads which jobs hold it (as many as the limit).
        held_by = sa.select(jobs.c.id).where(jobs.c.state == JobState.RUNNING.value, jobs.c.queue.in_(full_queues))
        claimed.waiting_on = set((await conn.execute(held_by)).scalars())
    claimed.resting = {task: at for task, window in windows.items() if (at := window.room_returns_at()) is not None}
    claimed.room_returns_at = min((claimed.resting[task] for task in out_of_allowance), default=None)
    return claimed


def _candidates(queues: Sequence[str], shut_tasks: Sequence[str], wanted: int, now: datetime) -> Any:
    query = sa.select(jobs.c.id, jobs.c.queue, jobs.c.task).where(
        IS_RUNNABLE, jobs.c.run_at <= now, jobs.c.queue.in_(list(queues))
    )
    if shut_tasks:
        query = query.where(jobs.c.task.notin_(list(shut_tasks)))
    return (
        query.order_by(jobs.c.priority.desc(), jobs.c.run_at, jobs.c.id).limit(wanted).with_for_update(skip_locked=True)
    )


async def _queue_room(
    conn: AsyncConnection, dialect: str, queues: Sequence[str], limits: ClaimLimits
) -> dict[str, int]:
    """Each limited queue's free room, counted under its lock."""
    if not queues:
        return {}
    if dialect == "postgresql":
        await conn.execute(_LOCK_QUEUES, {"keys": sorted({queue_lock_key(queue) for queue in queues})})
    counts = (
        sa.select(jobs.c.queue, sa.func.count())
        .where(jobs.c.state == JobState.RUNNING.value, jobs.c.queue.in_(queues))
        .group_by(jobs.c.queue)
    )
    running: dict[str, int] = dict((await conn.execute(counts)).all())
    return {queue: max(0, limits.queues[queue] - running.get(queue, 0)) for queue in queues}


async def _lock_windows(
    conn: AsyncConnection, dialect: str, tasks: Sequence[str], limits: ClaimLimits, now: datetime
) -> dict[str, StartWindow]:
    """Lock the rows of these rate-limited tasks (in name order) and read their recent starts."""
    if not tasks:
        return {}
    stored = await _select_locked(conn, tasks)
    if missing := [task for task in tasks if task not in stored]:
        # A task's first claim ever makes its row. The rows found are locked already, so the new
        # ones are locked out of name order: that can deadlock only with another first claim,
        # and PostgreSQL's deadlock error is retried like any transient one.
        await conn.execute(
            dialects.insert_ignoring_duplicates(rate_limits, dialect),
            [{"task": task, "starts": [], "updated_at": now} for task in missing],
        )
        stored |= await _select_locked(conn, missing)
    return {task: StartWindow(limits.rates[task], stored[task], now) for task in tasks}


async def _select_locked(conn: AsyncConnection, tasks: Sequence[str]) -> dict[str, list[list[int]]]:
    query = (
        sa.select(rate_limits.c.task, rate_limits.c.starts)
        .where(rate_limits.c.task.in_(list(tasks)))
        .order_by(rate_limits.c.task)
        .with_for_update()
    )
    return {task: list(starts) for task, starts in await conn.execute(query)}


async def _record_starts(
    conn: AsyncConnection, windows: Mapping[str, StartWindow], room_left: Mapping[str, int], now: datetime
) -> None:
    rows = []
    for task, window in windows.items():
        started = window.room - room_left[task]
        if started:
            window.spend(started)
            rows.append({"b_task": task, "b_starts": window.slots})
    if rows:
        change = (
            sa.update(rate_limits)
            .where(rate_limits.c.task == sa.bindparam("b_task"))
            .values(starts=sa.bindparam("b_starts", type_=JSONType), updated_at=now)
        )
        await conn.execute(change, rows)


class Waker:
    """Wakes a worker held up by a limit as soon as a claim may get further, not before.

    A full queue has room again when one of its running jobs finishes (finishes are announced
    in this process, and from every process on PostgreSQL); a task's allowance returns at a
    time the claim computed. Anything else that frees room (an attempt that fails and will be
    retried, a rescued lease) is found by the worker's usual poll. Until a task's allowance
    returns, claims pass it over without locking its row.
    """

    def __init__(self, wake: Callable[[], None]) -> None:
        self._wake = wake
        self._waiting_on: set[str] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._resting: dict[str, datetime] = {}

    def resting(self, now: datetime) -> list[str]:
        """Tasks whose allowance has not come back yet (other workers can only have spent more)."""
        self._resting = {task: at for task, at in self._resting.items() if at > now}
        return list(self._resting)

    def held_up(self, claimed: LimitedClaim, now: datetime) -> None:
        self._waiting_on = claimed.waiting_on
        self._resting.update(claimed.resting)
        if claimed.room_returns_at is None:
            return
        loop = asyncio.get_running_loop()
        due = loop.time() + max((claimed.room_returns_at - now).total_seconds(), _MIN_WAKE_SECONDS)
        if self._timer is not None and not self._timer.cancelled() and self._timer.when() <= due:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = loop.call_at(due, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._wake()

    def finished(self, job_ids: set[str]) -> None:
        if self._waiting_on & job_ids:
            self._waiting_on = set()
            self._wake()
