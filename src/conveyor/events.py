"""Named engine events. Logging (and later metrics and traces) subscribe; the engine only emits."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from conveyor.jobs import Job, JobError
from conveyor.log import enabled_for, log_hot

logger = structlog.get_logger("conveyor.worker")


class EventName(enum.StrEnum):
    STARTED = "job.started"
    SUCCEEDED = "job.succeeded"
    RETRYING = "job.retrying"
    DEAD = "job.dead"
    LOST = "job.lost"
    """A lease expired: the rescuer ended the attempt."""
    RELEASED = "job.released"
    """Handed back unfinished at shutdown, without burning an attempt."""
    CANCELLED = "job.cancelled"
    """Stopped while running because a user cancelled it."""


# Not frozen: two per attempt, and a frozen dataclass's __init__ costs several times a plain one's.
@dataclass(slots=True)
class JobEvent:
    name: EventName
    job: Job
    worker: str
    duration: float | None = None
    error: JobError | None = None
    retry_in: float | None = None


Subscriber = Callable[[JobEvent], None]


class Events:
    """A tiny synchronous hub. A subscriber that raises is logged and never breaks the engine."""

    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []

    def subscribe(self, subscriber: Subscriber) -> None:
        self._subscribers.append(subscriber)

    def emit(self, event: JobEvent) -> None:
        for subscriber in self._subscribers:
            try:
                subscriber(event)
            except Exception:
                logger.exception("event subscriber failed", subscriber=repr(subscriber), job_event=event.name)


# An expected retry is an anomaly handled (WARNING); a job going dead needs attention (ERROR).
_LEVELS = {
    EventName.STARTED: "debug",
    EventName.SUCCEEDED: "info",
    EventName.RETRYING: "warning",
    EventName.DEAD: "error",
    EventName.LOST: "warning",
    EventName.RELEASED: "info",
    EventName.CANCELLED: "info",
}


def log_event(event: JobEvent) -> None:
    level = _LEVELS[event.name]
    if not enabled_for(level):
        # Below the level (a job.started at INFO): skip building the line at all.
        return
    fields: dict[str, object] = {
        "job_id": event.job.id,
        "task": event.job.task,
        "queue": event.job.queue,
        "attempt": event.job.attempt,
        "worker": event.worker,
    }
    if event.job.correlation_id:
        fields["correlation_id"] = event.job.correlation_id
    if event.duration is not None:
        fields["duration_ms"] = round(event.duration * 1000, 3)
    if event.error is not None:
        fields["error_type"] = event.error.type
        fields["error"] = event.error.message
    if event.retry_in is not None:
        fields["retry_in_s"] = round(event.retry_in, 3)
    log_hot("conveyor.worker", level, event.name.value, fields)
