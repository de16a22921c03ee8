"""The HTTP contract: every request and response body, with unknown fields refused."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

from conveyor.jobs import AttemptRecord, Job, JobError
from conveyor.schedules import ScheduleStatus
from conveyor.workflows import Workflow

Name = Annotated[str, Field(min_length=1, max_length=255)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorBody(Strict):
    code: str = Field(description="Stable, machine-readable error code, e.g. `validation_error`.")
    message: str = Field(description="What went wrong, for people.")
    details: Any = Field(default=None, description="Structured detail: e.g. every invalid field.")
    correlation_id: str | None = Field(default=None, description="Quote it to find the request in the logs.")


class ErrorEnvelope(Strict):
    error: ErrorBody


class JobCreate(Strict):
    task: Name = Field(description="A registered task name (see `GET /tasks`).")
    args: list[Any] = Field(default_factory=list, description="Positional arguments (JSON).")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments (JSON).")
    queue: Name | None = Field(default=None, description="Defaults to the task's queue.")
    priority: int | None = Field(default=None, ge=-1_000_000, le=1_000_000, description="Higher runs first.")
    delay_seconds: float | None = Field(default=None, ge=0, le=366 * 86_400, description="Run no sooner than this.")
    run_at: AwareDatetime | None = Field(default=None, description="Run no sooner than this time (with a zone).")
    max_attempts: int | None = Field(default=None, ge=1, le=1_000)
    timeout_seconds: float | None = Field(default=None, gt=0, le=7 * 86_400)
    unique_key: Name | None = Field(
        default=None, description="While a job with this key is unfinished, submitting another returns that job."
    )

    @model_validator(mode="after")
    def _one_schedule(self) -> JobCreate:
        if self.delay_seconds is not None and self.run_at is not None:
            raise ValueError("give delay_seconds or run_at, not both")
        return self


class BatchItem(JobCreate):
    idempotency_key: Name | None = Field(default=None, description="Like the Idempotency-Key header, per item.")


class BatchCreate(Strict):
    jobs: list[BatchItem] = Field(min_length=1, description="At most the server's batch limit (default 1,000).")


class JobErrorPublic(Strict):
    type: str
    message: str

    @classmethod
    def of(cls, error: JobError | None) -> JobErrorPublic | None:
        return cls(type=error.type, message=error.message) if error else None


class AttemptPublic(Strict):
    attempt: int
    outcome: Literal["running", "succeeded", "failed", "lost", "released", "cancelled"]
    worker: str | None
    started_at: datetime | None
    ended_at: datetime | None
    error: JobErrorPublic | None = None

    @classmethod
    def of(cls, record: AttemptRecord) -> AttemptPublic:
        return cls(
            attempt=record.attempt,
            outcome=record.outcome.value,
            worker=record.worker.split("#")[0] if record.worker else None,
            started_at=record.started_at,
            ended_at=record.ended_at,
            error=JobErrorPublic.of(record.error),
        )


class JobPublic(Strict):
    id: str
    task: str
    queue: str
    priority: int
    state: Literal["scheduled", "queued", "running", "retrying", "succeeded", "dead", "cancelled", "waiting"]
    args: list[Any]
    kwargs: dict[str, Any]
    attempt: int
    max_attempts: int
    timeout_seconds: float | None
    run_at: datetime
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None = Field(description="When the current or latest attempt started.")
    finished_at: datetime | None
    cancel_requested_at: datetime | None = Field(
        default=None, description="When a cancel was asked of this running job; its worker is stopping it."
    )
    progress: dict[str, Any] | None = Field(
        default=None, description='What the task last reported: {"fraction", "message", "at"}.'
    )
    result: Any = Field(default=None, description="The task's return value, once succeeded.")
    error: JobErrorPublic | None = Field(default=None, description="The latest attempt's error.")
    correlation_id: str | None
    idempotency_key: str | None
    unique_key: str | None = None
    workflow_id: str | None = Field(default=None, description="The workflow this job is a step of.")
    waiting_on: int = Field(default=0, description="For a waiting step: how many jobs it still waits for.")

    @classmethod
    def of(cls, job: Job) -> JobPublic:
        key = job.idempotency_key.split(":", 1)[1] if job.idempotency_key and ":" in job.idempotency_key else None
        return cls(
            id=job.id,
            task=job.task,
            queue=job.queue,
            priority=job.priority,
            state=job.state.value,
            args=job.args,
            kwargs=job.kwargs,
            attempt=job.attempt,
            max_attempts=job.max_attempts,
            timeout_seconds=job.timeout_seconds,
            run_at=job.run_at,
            created_at=job.created_at,
            updated_at=job.updated_at,
            started_at=job.attempted_at,
            finished_at=job.finished_at,
            cancel_requested_at=job.cancel_requested_at,
            progress=job.progress,
            result=job.result,
            error=JobErrorPublic.of(job.error),
            correlation_id=job.correlation_id,
            idempotency_key=key,
            unique_key=job.unique_key,
            workflow_id=job.workflow_id,
            waiting_on=job.waiting_on,
        )


class JobsPublic(Strict):
    jobs: list[JobPublic]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next (older) page; null on the last.")


class BatchItemResult(Strict):
    index: int
    status: Literal["created", "replayed", "error"]
    job: JobPublic | None = None
    error: ErrorBody | None = None


class BatchResult(Strict):
    results: list[BatchItemResult] = Field(description="One per submitted job, in the request's order.")


class AttemptsPublic(Strict):
    job_id: str
    attempts: list[AttemptPublic]


class QueuePublic(Strict):
    name: str
    counts: dict[str, int] = Field(description="Jobs by state.")
    oldest_queued_age_seconds: float | None = Field(description="How long the oldest due job has waited.")


class QueuesPublic(Strict):
    queues: list[QueuePublic]


class TaskPublic(Strict):
    name: str
    kind: Literal["async", "sync", "cpu"]
    queue: str
    priority: int
    max_attempts: int | None
    timeout_seconds: float | None
    arguments_schema: dict[str, Any] = Field(description="JSON schema of the task's keyword arguments.")


class TasksPublic(Strict):
    tasks: list[TaskPublic]


class SchedulePublic(Strict):
    name: str
    task: str
    cron: str = Field(description="Five fields, or six with seconds last, read in `timezone`.")
    timezone: str = Field(description="An IANA time zone, e.g. `Europe/Paris`.")
    queue: str
    priority: int
    args: list[Any]
    kwargs: dict[str, Any]
    missed: Literal["skip", "catch_up"] = Field(
        description="Ticks that passed with no worker up: only the latest is enqueued, or all of them."
    )
    catch_up_limit: int = Field(description="With `catch_up`: the most missed ticks enqueued (the latest).")
    grace_seconds: float = Field(description="How late a tick may still be enqueued when none was known missed.")
    next_run_at: datetime = Field(description="The next tick.")
    last_tick_at: datetime | None = Field(
        description="The latest of the schedule's last 10 ticks that has a job; null if none has."
    )
    last_job_id: str | None = Field(description="That tick's job.")

    @classmethod
    def of(cls, status: ScheduleStatus) -> SchedulePublic:
        return cls.model_validate(status.to_json())


class SchedulesPublic(Strict):
    schedules: list[SchedulePublic] = Field(description="Sorted by name.")


class Health(Strict):
    status: Literal["ok"]


class Ready(Strict):
    status: Literal["ready", "not ready"]
    checks: dict[str, str]


class StepSpec(Strict):
    """One job of a workflow. After another step it receives that step's result as its first argument."""

    task: Name = Field(description="A registered task name.")
    args: list[Any] = Field(default_factory=list, description="Its own positional arguments, after the input.")
    kwargs: dict[str, Any] = Field(default_factory=dict)
    queue: Name | None = None
    priority: int | None = Field(default=None, ge=-1_000_000, le=1_000_000)
    max_attempts: int | None = Field(default=None, ge=1, le=1_000)
    timeout_seconds: float | None = Field(default=None, gt=0, le=7 * 86_400)
    immutable: bool = Field(default=False, description="Don't pass it the result of what it follows.")


class ChainSpec(Strict):
    chain: list[NodeSpec] = Field(min_length=1, description="Parts run in order; each receives the last result.")


class GroupSpec(Strict):
    group: list[NodeSpec] = Field(description="Members run side by side; the result is their results, in order.")


class ChordParts(Strict):
    group: list[NodeSpec]
    callback: NodeSpec


class ChordSpec(Strict):
    chord: ChordParts = Field(description="A group, then a callback run once with the list of results.")


def _node_kind(value: Any) -> str | None:
    """Which kind of node: the key a JSON object carries, or the model an object already is."""
    if isinstance(value, dict):
        return next((kind for kind in ("task", "chain", "group", "chord") if kind in value), None)
    return {StepSpec: "task", ChainSpec: "chain", GroupSpec: "group", ChordSpec: "chord"}.get(type(value))


NodeSpec = Annotated[
    Annotated[StepSpec, Tag("task")]
    | Annotated[ChainSpec, Tag("chain")]
    | Annotated[GroupSpec, Tag("group")]
    | Annotated[ChordSpec, Tag("chord")],
    Discriminator(
        _node_kind,
        custom_error_type="workflow_node",
        custom_error_message="a workflow node is an object with one of: task, chain, group, chord",
    ),
]


class WorkflowCreate(Strict):
    workflow: NodeSpec
    name: Name | None = Field(default=None, description="A label for people; not unique.")


class WorkflowPublic(Strict):
    id: str
    name: str | None
    state: Literal["running", "succeeded", "failed", "cancelled"]
    created_at: datetime
    correlation_id: str | None
    result: Any = Field(default=None, description="Once succeeded: shaped like the workflow (see docs).")
    counts: dict[str, int] = Field(description="Steps by state.")
    structure: dict[str, Any] = Field(description="The tree as submitted, with each step's job id.")
    jobs: list[JobPublic] = Field(description="Every step's job, in the order of the tree.")

    @classmethod
    def of(cls, workflow: Workflow) -> WorkflowPublic:
        return cls(
            id=workflow.id,
            name=workflow.name,
            state=workflow.state.value,
            created_at=workflow.created_at,
            correlation_id=workflow.correlation_id,
            result=workflow.result,
            counts=workflow.counts,
            structure=workflow.structure,
            jobs=[JobPublic.of(job) for job in workflow.jobs],
        )


ChainSpec.model_rebuild()
GroupSpec.model_rebuild()
ChordParts.model_rebuild()
