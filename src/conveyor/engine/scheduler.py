"""The scheduler: a small loop in every worker that enqueues the due ticks of the app's schedules.

Every worker runs one (for the schedules on the queues it serves), so schedules keep firing while
any worker is up. Each tick's job carries the idempotency key ``conveyor:schedule:<name>:<tick>``,
which the database holds unique across all jobs, finished ones included: however many workers
enqueue a tick, and however late, one job is stored for it.

A worker remembers the latest tick it handled. When it starts it knows nothing: with
``missed="skip"`` it enqueues the latest tick if it is recent enough; with ``missed="catch_up"`` it
asks the database for the schedule's latest stored tick and enqueues every tick since, so a
restart neither fires a tick again nor loses one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import structlog

from conveyor.errors import ConveyorError
from conveyor.jobs import Job, NewJob
from conveyor.schedules import TICK_TEXT_LENGTH, Schedule, ScheduleStatus
from conveyor.tasks import EnqueueOptions

if TYPE_CHECKING:
    from conveyor.app import Conveyor
    from conveyor.storage import Store

logger = structlog.get_logger("conveyor.scheduler")

RECENT_TICKS = 10
"""How many of a schedule's latest ticks a status looks through for its last job."""


class Scheduler:
    """Enqueues each schedule's due ticks; ``run()`` loops until cancelled, ``enqueue_due()`` looks once."""

    def __init__(self, app: Conveyor, schedules: Sequence[Schedule]) -> None:
        self.app = app
        self.schedules = tuple(schedules)
        self._clock: Callable[[], datetime] = app.clock
        self._interval = app.settings.schedule_interval_seconds
        self._retention = app.settings.retention_seconds
        self._handled: dict[str, datetime | None] = {}
        """Per schedule, the latest tick this worker enqueued or gave up; absent until its first look."""
        self._next_due: dict[str, datetime] = {}

    async def run(self) -> None:
        logger.info("scheduler.started", schedules=[schedule.name for schedule in self.schedules])
        while True:
            pause = self._interval
            try:
                await self.enqueue_due()
                pause = min(pause, self._seconds_to_next_tick())
            except ConveyorError as exc:
                logger.warning("scheduler.enqueue_failed", error=str(exc))
            except Exception:
                # A bug must not silence every schedule for the rest of the worker's life.
                logger.exception("scheduler.failed")
            await asyncio.sleep(pause)

    async def enqueue_due(self) -> list[Job]:
        """Enqueue every tick due now that this worker has not handled; return the jobs it stored.

        Ticks another worker stored already are found, not stored again, and not returned.
        """
        now = self._clock()
        store = await self.app.store()
        # A tick older than the retention period may have had its job pruned: never enqueue it again.
        not_before = now - timedelta(seconds=self._retention) if self._retention > 0 else None
        looked_at: list[Schedule] = []
        planned: list[tuple[Schedule, datetime, NewJob]] = []
        for schedule in self.schedules:
            if schedule.name in self._next_due and now < self._next_due[schedule.name]:
                continue
            if schedule.name not in self._handled:
                self._handled[schedule.name] = await self._last_stored_tick(store, schedule, now)
            looked_at.append(schedule)
            ticks = schedule.due(now=now, last=self._handled[schedule.name], not_before=not_before)
            planned.extend((schedule, tick, self._new_job(schedule, tick)) for tick in ticks)
        stored = await self.app.enqueue_many(new for _, _, new in planned) if planned else []
        # Only once the ticks are safely stored does this worker count them as handled.
        for schedule in looked_at:
            self._handled[schedule.name] = schedule.cron.latest_at_or_before(now)
            self._next_due[schedule.name] = schedule.next_run(now)
        enqueued = []
        for (schedule, tick, new), job in zip(planned, stored, strict=True):
            if job.id == new.id:
                enqueued.append(job)
                logger.info("schedule.enqueued", schedule=schedule.name, tick=tick.isoformat(), job_id=job.id)
        return enqueued

    def _new_job(self, schedule: Schedule, tick: datetime) -> NewJob:
        options = EnqueueOptions(
            queue=schedule.queue, priority=schedule.priority, run_at=tick, idempotency_key=schedule.key(tick)
        )
        return self.app.new_job(self.app.get_task(schedule.task), schedule.args, schedule.kwargs, options)

    async def _last_stored_tick(self, store: Store, schedule: Schedule, now: datetime) -> datetime | None:
        """Where a catch-up starts: the schedule's latest tick with a stored job (skip needs none)."""
        if schedule.missed != "catch_up":
            return None
        ticks = schedule.cron.ticks_back(now, after=None, limit=schedule.catch_up_limit)
        recent = {schedule.key(tick): tick for tick in ticks}
        found = await store.find_idempotency_keys(list(recent))
        if found:
            return max(recent[key] for key in found)
        # Down for longer than the catch-up reaches back, or a new schedule: only a scan can tell.
        key = await store.last_idempotency_key(schedule.key_prefix, length=len(schedule.key_prefix) + TICK_TEXT_LENGTH)
        return schedule.tick_of(key) if key else None

    def _seconds_to_next_tick(self) -> float:
        if not self._next_due:
            return self._interval
        return max((min(self._next_due.values()) - self._clock()).total_seconds(), 0.0)


async def schedule_statuses(store: Store, schedules: Sequence[Schedule], *, now: datetime) -> list[ScheduleStatus]:
    """Each schedule's next tick and the job of its latest recent tick, in one query for all of them."""
    recent = {schedule.name: schedule.cron.ticks_back(now, after=None, limit=RECENT_TICKS) for schedule in schedules}
    keys = {schedule.key(tick): (schedule.name, tick) for schedule in schedules for tick in recent[schedule.name]}
    latest: dict[str, tuple[datetime, str]] = {}
    for key, job_id in (await store.find_idempotency_keys(list(keys))).items():
        name, tick = keys[key]
        if name not in latest or tick > latest[name][0]:
            latest[name] = (tick, job_id)
    statuses = []
    for schedule in schedules:
        tick, job_id = latest.get(schedule.name, (None, None))
        statuses.append(ScheduleStatus(schedule, schedule.next_run(now), last_tick_at=tick, last_job_id=job_id))
    return statuses
