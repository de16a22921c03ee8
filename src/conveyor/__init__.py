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
    WorkflowNotFoundError,
)
from conveyor.jobs import AttemptRecord, Job, JobError, JobState, Outcome, Page
from conveyor.settings import Settings
from conveyor.tasks import Task
from conveyor.workflows import Chain, Chord, Group, Step, Workflow, WorkflowState, chain, chord, group

__all__ = [
    "CONTEXT",
    "AttemptRecord",
    "Chain",
    "Chord",
    "ConfigError",
    "Conveyor",
    "ConveyorError",
    "Exponential",
    "Group",
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
    "Step",
    "StorageError",
    "Task",
    "TaskArgumentsError",
    "TaskError",
    "UnknownTaskError",
    "Worker",
    "Workflow",
    "WorkflowNotFoundError",
    "WorkflowState",
    "chain",
    "chord",
    "constant",
    "group",
]
