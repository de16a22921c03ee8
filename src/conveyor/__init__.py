"""Conveyor: durable background jobs for Python, on SQLite or PostgreSQL."""

from conveyor.app import Conveyor
from conveyor.backoff import Exponential, constant
from conveyor.context import CONTEXT, JobContext
from conveyor.engine.worker import Worker
from conveyor.errors import (
    ConfigError,
    ConveyorError,
    JobNotFoundError,
    JobStateError,
    PermanentError,
    SchemaError,
    StorageError,
    TaskArgumentsError,
    TaskError,
    UnknownTaskError,
)
from conveyor.jobs import AttemptRecord, Job, JobError, JobState, Outcome, Page
from conveyor.settings import Settings
from conveyor.tasks import Task

__all__ = [
    "CONTEXT",
    "AttemptRecord",
    "ConfigError",
    "Conveyor",
    "ConveyorError",
    "Exponential",
    "Job",
    "JobContext",
    "JobError",
    "JobNotFoundError",
    "JobState",
    "JobStateError",
    "Outcome",
    "Page",
    "PermanentError",
    "SchemaError",
    "Settings",
    "StorageError",
    "Task",
    "TaskArgumentsError",
    "TaskError",
    "UnknownTaskError",
    "Worker",
    "constant",
]
