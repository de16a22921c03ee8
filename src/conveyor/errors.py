"""Every exception Conveyor raises on purpose.

    ConveyorError
    ├── ConfigError            settings or a database URL are invalid (lists every problem)
    ├── TaskError
    │   ├── UnknownTaskError   no task is registered under that name
    │   └── TaskArgumentsError the arguments do not fit the task (lists every problem)
    ├── StorageError           the database failed; the driver's error is its __cause__
    │   └── SchemaError        the schema is missing, behind, or newer than this Conveyor
    ├── JobNotFoundError       no job has that id
    ├── WorkflowNotFoundError  no workflow has that id
    └── JobStateError          the job's state does not allow the operation (a conflict)

    PermanentError             raised by a task: fail this job now, without retrying

No driver or third-party exception leaves the package: storage translates them into
``StorageError`` raised ``from`` the original.
"""

from __future__ import annotations

from collections.abc import Sequence


class ConveyorError(Exception):
    """Base of every error Conveyor raises on purpose."""


class ProblemsError(ConveyorError):
    """An error that carries every problem found, not just the first."""

    def __init__(self, summary: str, problems: Sequence[str] = ()) -> None:
        self.summary = summary
        self.problems = list(problems)
        lines = [summary, *(f"  - {problem}" for problem in self.problems)]
        super().__init__("\n".join(lines))


class ConfigError(ProblemsError):
    """Settings are invalid; raised at start-up, before any work is done."""


class TaskError(ConveyorError):
    """A task could not be found or called as asked."""


class UnknownTaskError(TaskError):
    def __init__(self, name: str, known: Sequence[str] = ()) -> None:
        self.name = name
        hint = f" (registered: {', '.join(sorted(known))})" if known else " (no tasks are registered)"
        super().__init__(f"unknown task {name!r}{hint}")


class TaskArgumentsError(ProblemsError, TaskError):
    """The arguments given for a job do not fit its task; nothing was stored."""


class StorageError(ConveyorError):
    """The database could not do what was asked."""


class SchemaError(StorageError):
    """The database schema is not the one this version of Conveyor expects."""


class JobNotFoundError(ConveyorError):
    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(f"no job with id {job_id!r}")


class WorkflowNotFoundError(ConveyorError):
    def __init__(self, workflow_id: str) -> None:
        self.workflow_id = workflow_id
        super().__init__(f"no workflow with id {workflow_id!r}")


class JobStateError(ConveyorError):
    """The job exists, but its current state does not allow the operation."""

    def __init__(
        self, job_id: str, state: str, operation: str, allowed: Sequence[str], *, reason: str | None = None
    ) -> None:
        self.job_id = job_id
        self.state = state
        self.operation = operation
        super().__init__(
            f"cannot {operation} job {job_id!r}: " + (reason or f"it is {state}; only {', '.join(allowed)} jobs can be")
        )


class PermanentError(Exception):
    """Raise from a task to fail the job at once: no further attempts, straight to the DLQ."""
