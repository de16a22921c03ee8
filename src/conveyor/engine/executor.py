"""Runs one attempt and says how it ended, as an ``Ack``. No SQL here."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Any

import structlog
from pydantic_core import PydanticSerializationError, to_jsonable_python

from conveyor.backoff import DEFAULT_BACKOFF
from conveyor.context import JobContext
from conveyor.engine.cpu import CpuPool, ProcessCrashedError, RemoteFailure
from conveyor.errors import PermanentError, UnknownTaskError
from conveyor.events import EventName, Events, JobEvent
from conveyor.jobs import Ack, AttemptRecord, Job, JobError, JobState, Outcome
from conveyor.tasks import Task, is_retryable


def describe(exc: BaseException) -> JobError:
    return JobError(
        type=type(exc).__name__,
        message=str(exc) or type(exc).__name__,
        traceback="".join(traceback.format_exception(exc)),
    )


class Executor:
    """Runs attempts: async tasks on the loop, sync tasks in threads, CPU tasks in processes."""

    def __init__(
        self,
        tasks: Callable[[str], Task[..., Any]],
        *,
        worker_id: str,
        cpu_pool: CpuPool,
        threads: ThreadPoolExecutor,
        events: Events,
        clock: Callable[[], datetime],
    ) -> None:
        self._tasks = tasks
        self._worker_id = worker_id
        self._cpu_pool = cpu_pool
        self._threads = threads
        self._events = events
        self._clock = clock

    async def execute(self, job: Job) -> Ack:
        """Run one attempt of a claimed job. Cancellation propagates: the caller hands the job back."""
        started_at = self._clock()
        started = time.perf_counter()
        self._events.emit(JobEvent(EventName.STARTED, job, self._worker_id))
        task: Task[..., Any] | None = None
        with structlog.contextvars.bound_contextvars(
            job_id=job.id, task=job.task, attempt=job.attempt, correlation_id=job.correlation_id
        ):
            try:
                task = self._tasks(job.task)
                result = await self._call(task, job)
                try:
                    stored = to_jsonable_python(result)
                except PydanticSerializationError as exc:
                    raise PermanentError(f"the task returned a {type(result).__name__}, which is not JSON") from exc
            except asyncio.CancelledError:
                raise
            except TimeoutError as exc:
                message = f"the attempt ran past its timeout of {job.timeout_seconds}s"
                error = JobError("TimeoutError", message, "".join(traceback.format_exception(exc)))
                return self._failed(job, task, error, retryable=True, started_at=started_at, started=started)
            except RemoteFailure as exc:
                return self._failed(job, task, exc.error, exc.retryable, started_at=started_at, started=started)
            except ProcessCrashedError as exc:
                return self._failed(job, task, describe(exc), retryable=True, started_at=started_at, started=started)
            except UnknownTaskError as exc:
                # Perhaps a deploy in progress: another worker may know the task, so it retries.
                return self._failed(job, None, describe(exc), retryable=True, started_at=started_at, started=started)
            except Exception as exc:  # noqa: BLE001 - a task may raise anything; it all becomes the job's error
                return self._failed(
                    job, task, describe(exc), is_retryable(task, exc), started_at=started_at, started=started
                )
        duration = time.perf_counter() - started
        self._events.emit(JobEvent(EventName.SUCCEEDED, job, self._worker_id, duration=duration))
        return Ack(
            job_id=job.id,
            lease_owner=job.lease_owner or "",
            state=JobState.SUCCEEDED,
            record=self._record(job, Outcome.SUCCEEDED, started_at),
            result=stored,
        )

    async def _call(self, task: Task[..., Any], job: Job) -> Any:
        context = JobContext(
            job_id=job.id,
            task=job.task,
            queue=job.queue,
            attempt=job.attempt,
            max_attempts=job.max_attempts,
            correlation_id=job.correlation_id,
        )
        timeout = job.timeout_seconds
        if task.options.cpu:
            return await self._cpu_pool.run(task.__module__, task.__qualname__, job.args, job.kwargs, context, timeout)
        args, kwargs = task.from_json_arguments(job.args, job.kwargs)
        if task.context_parameter:
            kwargs[task.context_parameter] = context
        if task.is_async:
            return await asyncio.wait_for(task.fn(*args, **kwargs), timeout)
        # A thread cannot be stopped: on timeout the attempt fails at once and its late result
        # is dropped; tasks that need a hard stop should be cpu=True.
        loop = asyncio.get_running_loop()
        call = functools.partial(task.fn, *args, **kwargs)
        return await asyncio.wait_for(loop.run_in_executor(self._threads, _in_context(call)), timeout)

    def _record(self, job: Job, outcome: Outcome, started_at: datetime, error: JobError | None = None) -> AttemptRecord:
        return AttemptRecord(
            attempt=job.attempt,
            worker=self._worker_id,
            started_at=started_at,
            ended_at=self._clock(),
            outcome=outcome,
            error=error,
        )

    def _failed(
        self,
        job: Job,
        task: Task[..., Any] | None,
        error: JobError,
        retryable: bool,
        *,
        started_at: datetime,
        started: float,
    ) -> Ack:
        duration = time.perf_counter() - started
        record = self._record(job, Outcome.FAILED, started_at, error)
        if retryable and job.attempt < job.max_attempts:
            backoff = task.options.backoff if task else DEFAULT_BACKOFF
            delay = max(0.0, float(backoff(job.attempt)))
            self._events.emit(
                JobEvent(EventName.RETRYING, job, self._worker_id, duration=duration, error=error, retry_in=delay)
            )
            return Ack(
                job_id=job.id,
                lease_owner=job.lease_owner or "",
                state=JobState.RETRYING,
                record=record,
                error=error,
                run_at=record.ended_at + timedelta(seconds=delay),
            )
        self._events.emit(JobEvent(EventName.DEAD, job, self._worker_id, duration=duration, error=error))
        return Ack(job_id=job.id, lease_owner=job.lease_owner or "", state=JobState.DEAD, record=record, error=error)

    def released(self, job: Job, started_at: datetime) -> Ack:
        """The ack for an attempt cut short by shutdown: queued again, the attempt given back."""
        self._events.emit(JobEvent(EventName.RELEASED, job, self._worker_id))
        return Ack(
            job_id=job.id,
            lease_owner=job.lease_owner or "",
            state=JobState.QUEUED,
            record=self._record(job, Outcome.RELEASED, started_at),
            run_at=self._clock(),
            attempt_delta=-1,
        )


def _in_context(call: Callable[[], Any]) -> Callable[[], Any]:
    """Carry the caller's contextvars (bound log fields) into the thread."""
    context = contextvars.copy_context()
    return lambda: context.run(call)
