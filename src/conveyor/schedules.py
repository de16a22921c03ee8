"""Periodic schedules: a task enqueued on every tick of a cron expression. No I/O here.

A tick is one moment a schedule fires, kept as a UTC instant. Each tick becomes one job whose
idempotency key names the schedule and the tick (``conveyor:schedule:<name>:<tick>``): the
database holds that key unique across all jobs, so a tick is stored once however many workers
enqueue it (see ``conveyor.engine.scheduler``).

Cron expressions are read in the schedule's time zone. Daylight saving time follows Vixie cron:

- A schedule that fires in every hour of the day (hour field ``*``) follows the wall clock: when
  the clock goes back, the repeated wall times are new moments and fire again; when it jumps
  forward, the wall times it skips never happen and do not fire. Either way ticks stay evenly
  spaced in real time.
- Any other schedule fires once per matching wall time: at its first occurrence when the clock
  goes back, and at the moment of the jump when the clock jumps over it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, TypedDict, get_args
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadDateError, CroniterError, croniter

from conveyor.errors import TaskArgumentsError
from conveyor.tasks import Task

Missed = Literal["skip", "catch_up"]
"""What becomes of ticks that passed while no worker looked: only the latest, or all (bounded)."""

KEY_PREFIX = "conveyor:schedule:"
_TICK_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
TICK_TEXT_LENGTH = len("2000-01-01T00:00:00Z")
MAX_NAME_LENGTH = 255 - len(KEY_PREFIX) - len(":") - TICK_TEXT_LENGTH
"""So that every tick's idempotency key fits the column (255 characters)."""
MAX_CATCH_UP_LIMIT = 1_000
DEFAULT_CATCH_UP_LIMIT = 100
DEFAULT_GRACE = timedelta(minutes=10)

_MAX_QUEUE_LENGTH = 255
_MICROSECOND = timedelta(microseconds=1)
# Any date will do: a valid expression has a tick after it (an impossible one, like 30 February, has none).
_VALIDATION_START = datetime(2000, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class _WallTime:
    """The instants at which a zone's wall clock shows one time."""

    earliest: datetime
    """The first instant the wall clock reaches this time (the jump, for a time it skips)."""
    latest: datetime
    """The last instant the wall clock shows this time (the second pass, for a time it repeats)."""
    fires: tuple[datetime, ...]
    """When a schedule matching this wall time fires: none, once, or (every-hour schedules) twice."""


class Cron:
    """A cron expression read in a time zone: five fields, or six with seconds last.

    ``* * * * * */10`` fires every ten seconds; ``30 9 * * 1-5`` at 09:30 on weekdays.
    """

    def __init__(self, expression: str, timezone: str = "UTC") -> None:
        fields = expression.split()
        if len(fields) not in (5, 6):
            raise ValueError(
                f"cron expression {expression!r} has {len(fields)} fields: give 5 "
                "(minute hour day-of-month month day-of-week), or 6 with seconds last"
            )
        try:
            self.zone = ZoneInfo(timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {timezone!r} (use an IANA name, e.g. 'Europe/Paris')") from None
        self.expression = " ".join(fields)
        self.timezone = timezone
        try:
            self._parsed = croniter(self.expression, _VALIDATION_START.replace(tzinfo=None))
            hours = self._parsed.expanded[1]
            self.every_hour = hours == ["*"] or set(hours) == set(range(24))
            self.next_after(_VALIDATION_START)
        except (CroniterError, TypeError) as exc:
            raise ValueError(f"cron expression {expression!r} is not valid: {exc}") from None

    def __repr__(self) -> str:
        return f"<Cron {self.expression!r} {self.timezone}>"

    def next_after(self, moment: datetime) -> datetime:
        """The first tick strictly after ``moment`` (an aware datetime), in UTC."""
        local = moment.astimezone(self.zone)
        wall = local.replace(tzinfo=None, fold=0)
        first, second = _both_passes(wall, self.zone)
        start = wall
        if self.every_hour and second > moment:
            # The clock will come back over this wall time: ticks of its second pass, up to an
            # hour or two of wall time behind us, still lie ahead.
            start = wall - (second - first)
        best: datetime | None = None
        for naive in self._walk(start, backward=False):
            wall_time = self._wall_time(naive)
            for instant in wall_time.fires:
                if instant > moment and (best is None or instant < best):
                    best = instant
            # Later wall times are reached no earlier than this one: nothing after it can do better.
            if best is not None and wall_time.earliest >= best:
                return best
        raise AssertionError("unreachable: croniter walks forever or raises")  # pragma: no cover

    def latest_at_or_before(self, moment: datetime) -> datetime | None:
        """The last tick at or before ``moment``, in UTC; None if there is none."""
        local = moment.astimezone(self.zone)
        wall = local.replace(tzinfo=None, fold=0)
        first, second = _both_passes(wall, self.zone)
        # croniter walks back strictly before its start: a microsecond later includes the wall time itself.
        start = wall + _MICROSECOND
        if first < moment:
            # The second pass of a repeated wall time: the first pass went further, up to where the
            # clock turned back, and its ticks are behind us.
            start += second - first
        best: datetime | None = None
        try:
            for naive in self._walk(start, backward=True):
                wall_time = self._wall_time(naive)
                for instant in wall_time.fires:
                    if instant <= moment and (best is None or instant > best):
                        best = instant
                # Earlier wall times were left no later than this one: nothing before it can do better.
                if best is not None and wall_time.latest <= best:
                    return best
        except CroniterBadDateError:
            return best
        raise AssertionError("unreachable: croniter walks forever or raises")  # pragma: no cover

    def ticks_back(self, moment: datetime, *, after: datetime | None, limit: int) -> list[datetime]:
        """The latest ``limit`` ticks in (``after``, ``moment``], oldest first."""
        ticks: list[datetime] = []
        tick = self.latest_at_or_before(moment)
        while tick is not None and (after is None or tick > after) and len(ticks) < limit:
            ticks.append(tick)
            tick = self.latest_at_or_before(tick - _MICROSECOND)
        ticks.reverse()
        return ticks

    def _walk(self, start: datetime, *, backward: bool) -> Iterator[datetime]:
        """Matching wall times (naive), from ``start`` on, one way or the other."""
        # A copy of the parsed expression: parsing again costs more than the walk itself.
        walker = copy.copy(self._parsed)
        walker.set_current(start, force=True)
        step = walker.get_prev if backward else walker.get_next
        while True:
            yield step(datetime)

    def _wall_time(self, naive: datetime) -> _WallTime:
        first, second = _both_passes(naive, self.zone)
        if first == second:
            return _WallTime(first, first, (first,))
        if first < second:
            # The clock went back: this wall time came twice.
            return _WallTime(first, second, (first, second) if self.every_hour else (first,))
        # The clock jumped over this wall time (PEP 495 then gives the later instant as fold 0).
        jump = _offset_change(second, first, self.zone)
        return _WallTime(jump, jump, () if self.every_hour else (jump,))


def _both_passes(naive: datetime, zone: ZoneInfo) -> tuple[datetime, datetime]:
    """``naive`` in ``zone`` with fold 0 and fold 1, in UTC: equal unless the clock changed around it."""
    return (
        naive.replace(tzinfo=zone, fold=0).astimezone(UTC),
        naive.replace(tzinfo=zone, fold=1).astimezone(UTC),
    )


def _offset_change(before: datetime, after: datetime, zone: ZoneInfo) -> datetime:
    """The first second at which ``zone`` has ``after``'s UTC offset, between the two instants."""
    low, high = int(before.timestamp()), int(after.timestamp())
    old_offset = before.astimezone(zone).utcoffset()
    while high - low > 1:
        middle = (low + high) // 2
        if datetime.fromtimestamp(middle, zone).utcoffset() == old_offset:
            low = middle
        else:
            high = middle
    return datetime.fromtimestamp(high, UTC)


@dataclass(frozen=True, slots=True, eq=False)
class Schedule:
    """A task enqueued on every tick of a cron expression, with fixed arguments.

    Made by ``app.schedule(...)`` or ``@app.periodic(...)``; ``args`` and ``kwargs`` are the
    checked arguments as JSON.
    """

    name: str
    task: str
    cron: Cron
    queue: str
    priority: int
    args: list[Any]
    kwargs: dict[str, Any]
    missed: Missed = "skip"
    catch_up_limit: int = DEFAULT_CATCH_UP_LIMIT
    """With ``missed="catch_up"``: the most missed ticks enqueued (the latest ones)."""
    grace: timedelta = DEFAULT_GRACE
    """How late a tick may be enqueued when it is the first this worker sees (or, with skip, after a gap)."""

    def __repr__(self) -> str:
        return f"<Schedule {self.name} {self.cron.expression!r} {self.cron.timezone} task={self.task}>"

    @property
    def key_prefix(self) -> str:
        return f"{KEY_PREFIX}{self.name}:"

    def key(self, tick: datetime) -> str:
        """The idempotency key of this schedule's job for ``tick``: fixed width, sorting by time."""
        return self.key_prefix + tick.astimezone(UTC).strftime(_TICK_FORMAT)

    def tick_of(self, key: str) -> datetime | None:
        """The tick a key of this schedule stands for; None for another schedule's key."""
        if not key.startswith(self.key_prefix):
            return None
        try:
            return datetime.strptime(key.removeprefix(self.key_prefix), _TICK_FORMAT).replace(tzinfo=UTC)
        except ValueError:
            return None

    def next_run(self, now: datetime) -> datetime:
        return self.cron.next_after(now)

    def due(self, *, now: datetime, last: datetime | None, not_before: datetime | None = None) -> list[datetime]:
        """The ticks to enqueue at ``now``, oldest first.

        ``last`` is the latest tick already handled (enqueued, or given up), None if unknown:
        only later ticks are due. No tick at or before ``not_before`` is ever returned (the
        worker passes the retention cutoff, before which a tick's job may have been pruned).

        - ``skip``: the latest tick, if it is at most ``grace`` old; older ones are dropped.
        - ``catch_up``: every tick after ``last``, at most ``catch_up_limit`` (the latest). With
          no ``last`` nothing is known to be missed, and it acts as ``skip``.
        """
        floor = last if not_before is None else not_before if last is None else max(last, not_before)
        if self.missed == "catch_up" and last is not None:
            return self.cron.ticks_back(now, after=floor, limit=self.catch_up_limit)
        latest = self.cron.latest_at_or_before(now)
        if latest is None or (floor is not None and latest <= floor) or now - latest > self.grace:
            return []
        return [latest]


class ScheduleOptions(TypedDict, total=False):
    """What ``app.schedule`` and ``@app.periodic`` take besides the cron expression (see ``define_schedule``)."""

    timezone: str
    name: str | None
    queue: str | None
    priority: int | None
    args: Sequence[Any]
    kwargs: Mapping[str, Any] | None
    missed: Missed
    catch_up_limit: int
    grace: float | timedelta


def define_schedule(
    task: Task[..., Any],
    cron: str,
    *,
    timezone: str = "UTC",
    name: str | None = None,
    queue: str | None = None,
    priority: int | None = None,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    missed: Missed = "skip",
    catch_up_limit: int = DEFAULT_CATCH_UP_LIMIT,
    grace: float | timedelta = DEFAULT_GRACE,
    taken: Mapping[str, Schedule],
) -> Schedule:
    """Check a schedule and return it; raise ``TypeError`` listing every problem.

    ``name`` defaults to the task's name; ``queue`` and ``priority`` to the task's; ``args`` and
    ``kwargs`` are passed to every tick's job. ``missed`` says what becomes of ticks that passed
    while no worker looked (see ``Schedule.due``); ``grace`` (seconds or a timedelta) is how late
    a tick may still be enqueued when nothing says it was missed.
    """
    schedule_name = name or task.name
    problems = []
    if not 0 < len(schedule_name) <= MAX_NAME_LENGTH:
        problems.append(f"name must be 1 to {MAX_NAME_LENGTH} characters")
    if schedule_name in taken:
        problems.append(f"the name {schedule_name!r} is taken by another schedule; pass name=... to tell them apart")
    parsed: Cron | None = None
    try:
        parsed = Cron(cron, timezone)
    except ValueError as exc:
        problems.append(str(exc))
    if queue is not None and not 0 < len(queue) <= _MAX_QUEUE_LENGTH:
        problems.append(f"queue must be 1 to {_MAX_QUEUE_LENGTH} characters")
    if missed not in get_args(Missed):
        problems.append(f"missed must be 'skip' or 'catch_up', not {missed!r}")
    if not 1 <= catch_up_limit <= MAX_CATCH_UP_LIMIT:
        problems.append(f"catch_up_limit must be 1 to {MAX_CATCH_UP_LIMIT}, not {catch_up_limit}")
    grace_period = grace if isinstance(grace, timedelta) else timedelta(seconds=grace)
    if grace_period < timedelta(0):
        problems.append(f"grace must not be negative, not {grace}")
    json_args: list[Any] = []
    json_kwargs: dict[str, Any] = {}
    try:
        json_args, json_kwargs = task.to_json_arguments(args, kwargs or {})
    except TaskArgumentsError as exc:
        problems.extend(exc.problems)
    if problems or parsed is None:
        raise TypeError(f"cannot schedule task {task.name!r}: " + "; ".join(problems))
    return Schedule(
        name=schedule_name,
        task=task.name,
        cron=parsed,
        queue=queue or task.options.queue,
        priority=priority if priority is not None else task.options.priority,
        args=json_args,
        kwargs=json_kwargs,
        missed=missed,
        catch_up_limit=catch_up_limit,
        grace=grace_period,
    )


@dataclass(frozen=True, slots=True)
class ScheduleStatus:
    """A schedule as it stands: its next tick, and the job of its latest recent tick."""

    schedule: Schedule
    next_run_at: datetime
    last_tick_at: datetime | None
    """The latest of the schedule's recent ticks that has a job (None if none of them has)."""
    last_job_id: str | None

    def to_json(self) -> dict[str, Any]:
        """The status as JSON-ready data (times as ISO 8601 strings, in UTC)."""
        schedule = self.schedule
        return {
            "name": schedule.name,
            "task": schedule.task,
            "cron": schedule.cron.expression,
            "timezone": schedule.cron.timezone,
            "queue": schedule.queue,
            "priority": schedule.priority,
            "args": schedule.args,
            "kwargs": schedule.kwargs,
            "missed": schedule.missed,
            "catch_up_limit": schedule.catch_up_limit,
            "grace_seconds": schedule.grace.total_seconds(),
            "next_run_at": self.next_run_at.isoformat(),
            "last_tick_at": self.last_tick_at.isoformat() if self.last_tick_at else None,
            "last_job_id": self.last_job_id,
        }
