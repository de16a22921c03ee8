"""What a running task can ask for about its own job."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import structlog


class CancelFlag:
    """Raised once when a user cancels the running job; read from the task's thread.

    A plain attribute rather than a ``threading.Event``: a worker makes one per job, nobody
    waits on it, and under the GIL a bool written by one thread is seen by the others.
    """

    __slots__ = ("_set",)

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set


@dataclass(frozen=True, slots=True)
class JobContext:
    """Passed to a task that declares a parameter annotated ``JobContext``.

    Plain data, so it crosses into the process pool of CPU-bound tasks as well.
    """

    job_id: str
    task: str
    queue: str
    attempt: int
    max_attempts: int
    correlation_id: str | None = None
    cancel_event: CancelFlag | None = field(default=None, repr=False, compare=False)
    """Set when a user cancels the running job (not there in a CPU task's process)."""
    progress_sink: Callable[[float, str | None], None] | None = field(default=None, repr=False, compare=False)

    def progress(self, fraction: float, message: str | None = None) -> None:
        """Report how far the task got (0.0 to 1.0), with an optional message.

        Cheap to call often: the worker writes the latest report to the job at most every
        ``CONVEYOR_PROGRESS_WRITE_SECONDS``. Shown on ``GET /jobs/{id}`` and ``conveyor jobs show``.
        """
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"progress is a fraction from 0.0 to 1.0, not {fraction}")
        if self.progress_sink is None:
            raise RuntimeError("progress is reported by async and sync tasks run by a worker, not from cpu=True tasks")
        self.progress_sink(fraction, message[:500] if message else None)

    @property
    def cancel_requested(self) -> bool:
        """True once the job was cancelled: a sync task should check it and return early.

        Async tasks need not: they get ``CancelledError`` at their next ``await``. A sync task
        that ignores it is abandoned after ``CONVEYOR_CANCEL_GRACE_SECONDS``; a CPU task's
        process is killed then.
        """
        return self.cancel_event is not None and self.cancel_event.is_set()

    @property
    def is_last_attempt(self) -> bool:
        return self.attempt >= self.max_attempts

    @property
    def http(self) -> httpx.AsyncClient:
        """An HTTP client that sends this job's correlation id and trace with every request.

        Shared by the worker's async tasks; there is none in a CPU task's process.
        """
        from conveyor.outgoing import current_client  # noqa: PLC0415 - avoids an import cycle

        return current_client()

    @property
    def logger(self) -> Any:
        """A structlog logger already bound to this job's identity."""
        return structlog.get_logger("conveyor.task").bind(
            job_id=self.job_id,
            task=self.task,
            attempt=self.attempt,
            correlation_id=self.correlation_id,
        )


class _InjectedContext:
    """The default of a ``JobContext`` parameter: the worker always passes the real context."""

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(
            f"JobContext.{name} is only there when a worker runs the task; called directly, the task has no job"
        )

    def __repr__(self) -> str:
        return "conveyor.CONTEXT"


CONTEXT: Any = _InjectedContext()
"""Default for a task's context parameter, so callers (and type checkers) need not pass one::

    @app.task
    async def send(to: str, ctx: JobContext = CONTEXT) -> None:
        ctx.logger.info("sending", to=to)
"""
