"""``Conveyor``: the task registry and the one facade that the API, the CLI and workers use."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import inspect
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, ParamSpec, Self, TypeVar, Unpack, overload

from opentelemetry.trace import SpanKind

from conveyor import tracing
from conveyor.backoff import DEFAULT_BACKOFF, BackoffFunction
from conveyor.correlation import current_correlation_id
from conveyor.engine.scheduler import schedule_statuses
from conveyor.errors import JobNotFoundError, TaskArgumentsError, UnknownTaskError, WorkflowNotFoundError
from conveyor.jobs import Job, JobFilter, JobState, NewJob, Page, QueueStats, fast_constructor
from conveyor.limits import parse_rate_limit
from conveyor.metrics import Metrics
from conveyor.schedules import Schedule, ScheduleOptions, ScheduleStatus, define_schedule
from conveyor.settings import Settings, load_settings
from conveyor.storage import Store, open_store
from conveyor.tasks import NO_OPTIONS, EnqueueOptions, Task, TaskOptions
from conveyor.workflows import Node, Step, Workflow, compile_workflow

P = ParamSpec("P")
R = TypeVar("R")

MAX_NAME_LENGTH = 255
_build_new_job = fast_constructor(NewJob)
# Concurrent single enqueues (the HTTP API under load) on PostgreSQL: with one insert out at a
# time, `conveyor serve` sat 15 to 20 % idle under `wrk` waiting for each commit; with two it is
# busy throughout (2,088 and 2,474 against 2,400 and 2,536 `POST /jobs` a second).
_POSTGRES_INSERTS_IN_FLIGHT = 2


def utcnow() -> datetime:
    return datetime.now(UTC)


class Conveyor:
    """A Conveyor application: its settings, its tasks, and its connection to the database.

    ``Conveyor()`` reads ``CONVEYOR_*`` environment variables (and ``.env``); keyword arguments
    override them, e.g. ``Conveyor(database_url="sqlite:///jobs.db")``. Nothing connects until
    the first call that needs the database; ``async with app:`` or ``await app.close()`` ends it.
    """

    def __init__(self, settings: Settings | None = None, **overrides: Any) -> None:
        self.settings = settings if settings is not None else load_settings(**overrides)
        self.clock: Callable[[], datetime] = utcnow
        self.metrics = Metrics()
        self._tasks: dict[str, Task[..., Any]] = {}
        self._schedules: dict[str, Schedule] = {}
        self._store: Store | None = None
        self._store_loop: asyncio.AbstractEventLoop | None = None
        self._store_lock: asyncio.Lock | None = None
        self._group_commit: _GroupCommit | None = None

    def __repr__(self) -> str:
        return f"<Conveyor {self.settings.database_url} tasks={len(self._tasks)}>"

    # -- tasks --------------------------------------------------------------------------

    @overload
    def task(self, fn: Callable[P, R], /) -> Task[P, R]: ...

    @overload
    def task(
        self,
        *,
        name: str | None = None,
        queue: str = "default",
        priority: int = 0,
        max_attempts: int | None = None,
        backoff: BackoffFunction = DEFAULT_BACKOFF,
        retry_on: type[BaseException] | tuple[type[BaseException], ...] = Exception,
        timeout: float | timedelta | None = None,
        cpu: bool = False,
        unique_key: Callable[..., str] | None = None,
        rate_limit: str | None = None,
    ) -> Callable[[Callable[P, R]], Task[P, R]]: ...

    def task(
        self,
        fn: Callable[P, R] | None = None,
        /,
        *,
        name: str | None = None,
        queue: str = "default",
        priority: int = 0,
        max_attempts: int | None = None,
        backoff: BackoffFunction = DEFAULT_BACKOFF,
        retry_on: type[BaseException] | tuple[type[BaseException], ...] = Exception,
        timeout: float | timedelta | None = None,
        cpu: bool = False,
        unique_key: Callable[..., str] | None = None,
        rate_limit: str | None = None,
    ) -> Task[P, R] | Callable[[Callable[P, R]], Task[P, R]]:
        """Register a function as a task: ``async def`` runs on the event loop, plain ``def`` in a
        thread, and ``cpu=True`` in a process pool.

        ``retry_on`` limits which exceptions are retried (``PermanentError`` never is);
        ``backoff`` maps the failed attempt's number to seconds before the next;
        ``unique_key`` maps the job's arguments to a key: while a job with that key is
        unfinished, enqueueing another returns that job instead of adding one;
        ``rate_limit`` (``"10/s"``, ``"100/m"``, ``"1000/h"``) caps how many of its attempts start
        in any second, minute or hour, on all workers together.
        """
        timeout_seconds = timeout.total_seconds() if isinstance(timeout, timedelta) else timeout
        retry_types = retry_on if isinstance(retry_on, tuple) else (retry_on,)

        def register(function: Callable[P, R]) -> Task[P, R]:
            task_name = name or getattr(function, "__name__", None)
            problems = _option_problems(queue=queue, max_attempts=max_attempts, timeout=timeout_seconds)
            rate = None
            if rate_limit is not None:
                try:
                    rate = parse_rate_limit(rate_limit)
                except ValueError as exc:
                    problems.append(str(exc))
            if not task_name or len(task_name) > MAX_NAME_LENGTH:
                problems.append(f"name must be 1 to {MAX_NAME_LENGTH} characters")
            if task_name in self._tasks:
                existing = self._tasks[task_name]
                problems.append(
                    f"the name {task_name!r} is taken by {existing.__module__}.{existing.__qualname__}; "
                    "pass name=... to tell them apart"
                )
            if cpu and inspect.iscoroutinefunction(function):
                problems.append("cpu=True runs the function in another process: it must be a plain def")
            if cpu and "<locals>" in getattr(function, "__qualname__", ""):
                problems.append("cpu=True tasks must be defined at module level, so another process can import them")
            if problems:
                raise TypeError(f"cannot register task {task_name!r}: " + "; ".join(problems))
            options = TaskOptions(
                queue=queue,
                priority=priority,
                max_attempts=max_attempts,
                timeout=timeout_seconds,
                backoff=backoff,
                retry_on=retry_types,
                cpu=cpu,
                unique_key=unique_key,
                rate_limit=rate,
            )
            registered = Task(self, function, str(task_name), options)
            self._tasks[registered.name] = registered
            return registered

        return register(fn) if fn is not None else register

    @property
    def tasks(self) -> Mapping[str, Task[..., Any]]:
        return dict(self._tasks)

    def get_task(self, name: str) -> Task[..., Any]:
        try:
            return self._tasks[name]
        except KeyError:
            raise UnknownTaskError(name, list(self._tasks)) from None

    # -- schedules ----------------------------------------------------------------------

    def schedule(self, task: Task[..., Any] | str, cron: str, **options: Unpack[ScheduleOptions]) -> Schedule:
        """Enqueue ``task`` on every tick of ``cron`` (5 fields, or 6 with seconds last) in ``timezone``.

        Workers enqueue each tick once, whatever their number. Options: timezone ("UTC"), name
        (the task's), queue and priority (the task's), args and kwargs, missed ("skip" or
        "catch_up"), catch_up_limit (100), grace (600 seconds).
        """
        found = self.get_task(task if isinstance(task, str) else task.name)
        if not isinstance(task, str) and found is not task:
            raise TypeError(f"cannot schedule task {task.name!r}: it is registered on another app")
        schedule = define_schedule(found, cron, taken=self._schedules, **options)
        self._schedules[schedule.name] = schedule
        return schedule

    def periodic(
        self, cron: str, **options: Unpack[ScheduleOptions]
    ) -> Callable[[Callable[P, R] | Task[P, R]], Task[P, R]]:
        """Decorator: ``@app.periodic("*/5 * * * *")`` registers the function as a task (unless it
        is one already, from ``@app.task``) and schedules it; see ``schedule`` for the options."""

        def register(function: Callable[P, R] | Task[P, R]) -> Task[P, R]:
            task = function if isinstance(function, Task) else self.task(function)
            self.schedule(task, cron, **options)
            return task

        return register

    @property
    def schedules(self) -> Mapping[str, Schedule]:
        return dict(self._schedules)

    async def list_schedules(self) -> list[ScheduleStatus]:
        """Every schedule, by name, with its next tick and the job of its latest recent tick."""
        ordered = [self._schedules[name] for name in sorted(self._schedules)]
        return await schedule_statuses(await self.store(), ordered, now=self.clock())

    # -- the store ----------------------------------------------------------------------

    async def store(self) -> Store:
        """The store, opened (and migrated, where allowed) on first use in this event loop."""
        loop = asyncio.get_running_loop()
        if self._store is not None and self._store_loop is loop:
            return self._store
        if self._store_lock is None or self._store_loop is not loop:
            # A store is bound to the loop that opened it; a new loop (another asyncio.run)
            # gets its own rather than touching connections owned by a finished loop.
            self._store, self._store_loop, self._store_lock = None, loop, asyncio.Lock()
        async with self._store_lock:
            if self._store is None:
                self._store = await open_store(self.settings)
                # PostgreSQL commits on separate connections in parallel; SQLite has one writer.
                in_flight = _POSTGRES_INSERTS_IN_FLIGHT if self._store.dialect == "postgresql" else 1
                self._group_commit = _GroupCommit(self._store, self._now, max_in_flight=in_flight)
            return self._store

    def _now(self) -> datetime:
        # Read at each call, not bound once: tests (and apps) may swap ``self.clock`` later.
        return self.clock()

    async def close(self) -> None:
        store, self._store = self._store, None
        if store is not None and self._store_loop is asyncio.get_running_loop():
            await store.close()

    async def __aenter__(self) -> Self:
        await self.store()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- enqueueing ---------------------------------------------------------------------

    def new_job(
        self,
        task: Task[..., Any],
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        options: EnqueueOptions,
        *,
        takes_input: bool = False,
    ) -> NewJob:
        """Check a job against its task and return it ready to store; raise with every problem.

        ``takes_input``: a workflow step whose first argument is the result of what it follows.
        """
        problems: list[str] = []
        try:
            json_args, json_kwargs = task.to_json_arguments(args, kwargs, takes_input=takes_input)
        except TaskArgumentsError as exc:
            problems.extend(exc.problems)
            json_args, json_kwargs = [], {}
        if options is NO_OPTIONS:
            delay = timeout = None  # nothing given, nothing to check (`task.job()` in a bulk enqueue)
        else:
            delay = options.delay.total_seconds() if isinstance(options.delay, timedelta) else options.delay
            timeout = options.timeout.total_seconds() if isinstance(options.timeout, timedelta) else options.timeout
            problems.extend(
                _option_problems(
                    queue=options.queue,
                    max_attempts=options.max_attempts,
                    timeout=timeout,
                    delay=delay,
                    run_at=options.run_at,
                    idempotency_key=options.idempotency_key,
                    correlation_id=options.correlation_id,
                )
            )
        unique_key = options.unique_key
        if unique_key is None and task.options.unique_key is not None and not problems:
            unique_key = str(task.options.unique_key(*args, **kwargs))
        if unique_key is not None and not 0 < len(unique_key) <= MAX_NAME_LENGTH:
            problems.append(f"unique_key must be 1 to {MAX_NAME_LENGTH} characters")
        if problems:
            raise TaskArgumentsError(f"cannot enqueue task {task.name!r}", problems)
        run_at = options.run_at
        if delay:
            run_at = self.clock() + timedelta(seconds=delay)
        # Positional, in NewJob's field order: by keyword, `task.job()` took 3.5 µs instead of 2.3.
        return _build_new_job(
            task.name,
            json_args,
            json_kwargs,
            options.queue or task.options.queue,
            options.priority if options.priority is not None else task.options.priority,
            options.max_attempts or task.options.max_attempts or self.settings.max_attempts,
            run_at,
            timeout if timeout is not None else task.options.timeout,
            options.idempotency_key,
            None,  # request_digest: set by the HTTP API, which has the request
            unique_key,
            None,  # trace_context: set by the enqueue, inside its span
            # A job enqueued while handling a request, or by another job, carries its correlation id.
            options.correlation_id or current_correlation_id(),
        )

    async def enqueue_new(self, new: NewJob, *, connection: Any = None) -> Job:
        """Store one checked job. Concurrent calls in this process share one transaction."""
        (job,) = await self._enqueue([new], connection=connection, grouped=connection is None)
        return job

    async def enqueue(
        self,
        task: str | Task[..., Any],
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        connection: Any = None,
        **options: Any,
    ) -> Job:
        """Enqueue by task name (or task) with explicit args/kwargs and options (see ``Task.using``)."""
        found = task if isinstance(task, Task) else self.get_task(task)
        new = self.new_job(found, args, kwargs or {}, EnqueueOptions(**options))
        return await self.enqueue_new(new, connection=connection)

    async def enqueue_workflow(self, workflow: Node, *, name: str | None = None, connection: Any = None) -> Workflow:
        """Store a workflow (``chain``, ``group``, ``chord``, or one ``task.step``) in one transaction.

        Every step is checked first, and every problem reported at once; nothing is stored
        unless all are fine. Steps that follow others wait; the rest are queued at once.
        """
        if name is not None and not 0 < len(name) <= MAX_NAME_LENGTH:
            raise TaskArgumentsError("cannot enqueue the workflow", [f"name must be 1 to {MAX_NAME_LENGTH} characters"])

        def check_step(step: Step, *, takes_input: bool) -> NewJob:
            options = step.options or EnqueueOptions()
            if options.unique_key is not None or options.idempotency_key is not None:
                raise TaskArgumentsError(
                    "bad step", ["unique_key and idempotency_key apply to single jobs, not workflow steps"]
                )
            return self.new_job(step.task, step.args, step.kwargs, options, takes_input=takes_input)

        compiled = compile_workflow(workflow, new_job=check_step, correlation_id=current_correlation_id())
        for new in compiled.jobs:
            self.get_task(new.task)
        store = await self.store()
        with tracing.tracer().start_as_current_span("enqueue workflow", kind=SpanKind.PRODUCER) as span:
            span.set_attribute("messaging.system", "conveyor")
            span.set_attribute("messaging.batch.message_count", len(compiled.jobs))
            carrier = tracing.current_context_carrier()
            if carrier:
                compiled.jobs = [dataclasses.replace(new, trace_context=carrier) for new in compiled.jobs]
            stored = await store.insert_workflow(compiled, name=name, now=self.clock(), connection=connection)
        if self.settings.metrics_enabled:
            for job in stored.jobs:
                self.metrics.enqueued.labels(job.queue, job.task).inc()
        return stored

    async def get_workflow(self, workflow_id: str) -> Workflow:
        workflow = await (await self.store()).get_workflow(workflow_id)
        if workflow is None:
            raise WorkflowNotFoundError(workflow_id)
        return workflow

    async def wait_for_workflow(
        self, workflow_id: str, *, timeout: float | None = None, poll: float = 0.05
    ) -> Workflow:
        """The workflow once every job of it has finished, or as it is when ``timeout`` seconds have passed."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            workflow = await self.get_workflow(workflow_id)
            if workflow.finished or (deadline is not None and loop.time() >= deadline):
                return workflow
            pause = poll if deadline is None else min(poll, max(deadline - loop.time(), 0))
            await asyncio.sleep(pause)
            poll = min(poll * 1.5, 1.0)

    async def enqueue_many(self, jobs: Iterable[NewJob], *, connection: Any = None) -> list[Job]:
        """Store many checked jobs (from ``task.job(...)``) in one transaction."""
        return await self._enqueue(list(jobs), connection=connection, grouped=False)

    async def _enqueue(self, batch: list[NewJob], *, connection: Any, grouped: bool) -> list[Job]:
        for name in dict.fromkeys(new.task for new in batch):  # each task once, the first unknown one named
            self.get_task(name)
        store = await self.store()
        with _producer_span("enqueue", len(batch)):
            carrier = tracing.current_context_carrier()
            if carrier:
                batch = [dataclasses.replace(new, trace_context=carrier) for new in batch]
            if grouped and self._group_commit is not None:
                stored = [await self._group_commit.submit(batch[0])]
            else:
                stored = await store.insert_jobs(batch, now=self.clock(), connection=connection)
        if self.settings.metrics_enabled:
            if len(batch) == 1:
                if stored[0].id == batch[0].id:
                    self.metrics.enqueued.labels(stored[0].queue, stored[0].task).inc()
                return stored
            added = collections.Counter(
                (job.queue, job.task) for new, job in zip(batch, stored, strict=True) if job.id == new.id
            )
            for (queue, task), count in added.items():
                self.metrics.enqueued.labels(queue, task).inc(count)
        return stored

    # -- reading and operating ------------------------------------------------------------

    async def get_job(self, job_id: str) -> Job:
        job = await (await self.store()).get_job(job_id)
        if job is None:
            raise JobNotFoundError(job_id)
        return job

    async def wait_for_job(self, job_id: str, *, timeout: float | None = None, poll: float = 0.05) -> Job:
        """The job once it has finished, or as it is when ``timeout`` seconds have passed."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            job = await self.get_job(job_id)
            if job.finished or (deadline is not None and loop.time() >= deadline):
                return job
            pause = poll if deadline is None else min(poll, max(deadline - loop.time(), 0))
            await asyncio.sleep(pause)
            poll = min(poll * 1.5, 1.0)

    async def list_jobs(
        self,
        *,
        states: Iterable[JobState | str] = (),
        queue: str | None = None,
        task: str | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        cursor: str | None = None,
        limit: int = 50,
    ) -> Page:
        job_filter = JobFilter(
            states=tuple(JobState(state) for state in states),
            queue=queue,
            task=task,
            created_after=created_after,
            created_before=created_before,
        )
        return await (await self.store()).list_jobs(job_filter, cursor=cursor, limit=limit)

    async def cancel_job(self, job_id: str) -> Job:
        return await (await self.store()).cancel_job(job_id, now=self.clock())

    async def retry_job(self, job_id: str) -> Job:
        """Queue a dead or cancelled job again (a dead-letter replay)."""
        return await (await self.store()).retry_job(job_id, now=self.clock())

    async def queue_stats(self) -> list[QueueStats]:
        return await (await self.store()).queue_stats()

    async def prune(self, older_than: float | timedelta) -> int:
        """Delete finished jobs that finished more than ``older_than`` (seconds) ago."""
        seconds = older_than.total_seconds() if isinstance(older_than, timedelta) else older_than
        cutoff = self.clock() - timedelta(seconds=seconds)
        return await (await self.store()).prune_jobs(finished_before=cutoff)


@contextlib.contextmanager
def _producer_span(name: str, count: int) -> Generator[None]:
    """The span of an enqueue; none at all when no tracer provider is installed.

    A no-op span records nothing, yet building and entering it costs more than the rest of a
    single enqueue's bookkeeping; what it would carry (the caller's trace context, if any) is
    already current and reaches the job through ``current_context_carrier`` all the same.
    """
    if not tracing.tracing_installed():
        yield
        return
    with tracing.tracer().start_as_current_span(name, kind=SpanKind.PRODUCER) as span:
        span.set_attribute("messaging.system", "conveyor")
        span.set_attribute("messaging.batch.message_count", count)
        yield


class _GroupCommit:
    """Single enqueues that arrive together are written in one transaction.

    The first waits for no one: it inserts its job itself, at once, in its own task. Whatever
    arrives while ``max_in_flight`` inserts are out forms the next batch, which a flush task
    writes as soon as one of them is done, so under load a transaction carries many jobs and when
    idle a job pays no extra wait (nor the hop through another task, about a tenth of an idle
    enqueue). More than one insert in flight lets one batch's commit wait for the disk while the
    next is written: on PostgreSQL, whose connections commit in parallel.
    """

    def __init__(
        self, store: Store, clock: Callable[[], datetime], *, max_batch: int = 500, max_in_flight: int = 1
    ) -> None:
        self._store = store
        self._clock = clock
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._pending: list[tuple[NewJob, asyncio.Future[Job]]] = []
        self._in_flight = 0
        # Held here: the loop keeps only a weak reference to a task.
        self._flushing: set[asyncio.Task[None]] = set()

    async def submit(self, new: NewJob) -> Job:
        if self._in_flight >= self._max_in_flight:
            future: asyncio.Future[Job] = asyncio.get_running_loop().create_future()
            self._pending.append((new, future))
            return await future
        self._in_flight += 1
        try:
            return (await self._store.insert_jobs([new], now=self._clock()))[0]
        finally:
            self._in_flight -= 1
            self._next_batches()

    def _next_batches(self) -> None:
        """Hand what waits to flush tasks, as many as may be in flight."""
        while self._pending and self._in_flight < self._max_in_flight:
            batch, self._pending = self._pending[: self._max_batch], self._pending[self._max_batch :]
            self._in_flight += 1
            flushing = asyncio.get_running_loop().create_task(self._flush(batch), name="conveyor-group-commit")
            self._flushing.add(flushing)
            flushing.add_done_callback(self._flushing.discard)

    async def _flush(self, batch: list[tuple[NewJob, asyncio.Future[Job]]]) -> None:
        try:
            stored = await self._store.insert_jobs([new for new, _ in batch], now=self._clock())
        except asyncio.CancelledError:
            # The loop is shutting down: nobody is left to write what waits.
            waiting, self._pending = [*batch, *self._pending], []
            for _, future in waiting:
                future.cancel()
            self._in_flight -= 1
            raise
        except Exception as exc:  # noqa: BLE001 - each waiting caller gets the failure as its own
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
        else:
            for (_, future), job in zip(batch, stored, strict=True):
                if not future.done():
                    future.set_result(job)
        self._in_flight -= 1
        self._next_batches()


def _option_problems(
    *,
    queue: str | None = None,
    max_attempts: int | None = None,
    timeout: float | None = None,
    delay: float | None = None,
    run_at: datetime | None = None,
    idempotency_key: str | None = None,
    correlation_id: str | None = None,
) -> list[str]:
    problems = []
    if queue is not None and not 0 < len(queue) <= MAX_NAME_LENGTH:
        problems.append(f"queue must be 1 to {MAX_NAME_LENGTH} characters")
    if max_attempts is not None and max_attempts < 1:
        problems.append(f"max_attempts must be at least 1, not {max_attempts}")
    if timeout is not None and timeout <= 0:
        problems.append(f"timeout must be positive, not {timeout}")
    if delay is not None and delay < 0:
        problems.append(f"delay must not be negative, not {delay}")
    if delay is not None and run_at is not None:
        problems.append("give delay or run_at, not both")
    if run_at is not None and run_at.tzinfo is None:
        problems.append("run_at must be timezone-aware (e.g. datetime.now(UTC))")
    for label, value in (("idempotency_key", idempotency_key), ("correlation_id", correlation_id)):
        if value is not None and not 0 < len(value) <= MAX_NAME_LENGTH:
            problems.append(f"{label} must be 1 to {MAX_NAME_LENGTH} characters")
    return problems
