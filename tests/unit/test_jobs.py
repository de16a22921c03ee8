"""Jobs as plain data: their JSON forms."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime, timedelta

import pytest

from conveyor.jobs import (
    FINISHED_STATES,
    AttemptRecord,
    Job,
    JobError,
    JobState,
    NewJob,
    Outcome,
    fast_constructor,
    new_job_id,
)

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
ERROR = JobError(type="ValueError", message="bad input", traceback="Traceback (most recent call last): ...")


def full_job() -> Job:
    """A job with every field set to something other than its default."""
    return Job(
        id=new_job_id(),
        task="reports.build",
        queue="reports",
        priority=4,
        state=JobState.RETRYING,
        args=[1, "two", {"three": [3]}],
        kwargs={"fast": True},
        attempt=2,
        max_attempts=5,
        run_at=T0 + timedelta(minutes=5),
        created_at=T0 - timedelta(hours=1),
        updated_at=T0,
        timeout_seconds=12.5,
        lease_owner="worker-1#7",
        lease_expires_at=T0 + timedelta(seconds=30),
        attempted_at=T0 - timedelta(seconds=3),
        finished_at=T0 + timedelta(days=1),
        result={"rows": 10},
        error=ERROR,
        history=(
            AttemptRecord(attempt=1, worker="w#1", started_at=T0, ended_at=T0, outcome=Outcome.FAILED, error=ERROR),
        ),
        idempotency_key="key-1",
        correlation_id="req-9",
        parent_id=new_job_id(),
        workflow_id=new_job_id(),
    )


# Kept on the row but not shown: the fingerprint of the request that used an idempotency key.
NOT_SHOWN = {"request_digest", "trace_context"}


def test_job_to_json_has_every_field() -> None:
    job = full_job()

    assert set(job.to_json()) == {field.name for field in dataclasses.fields(Job)} - NOT_SHOWN


def test_job_to_json_is_json_and_carries_every_value_back() -> None:
    job = full_job()

    data = json.loads(json.dumps(job.to_json()))

    plain = {"id", "task", "queue", "priority", "args", "kwargs", "attempt", "max_attempts", "timeout_seconds"}
    plain |= {"lease_owner", "result", "idempotency_key", "correlation_id", "parent_id", "workflow_id"}
    for name in plain:
        assert data[name] == getattr(job, name), name
    for name in ("run_at", "created_at", "updated_at", "lease_expires_at", "attempted_at", "finished_at"):
        assert datetime.fromisoformat(data[name]) == getattr(job, name), name
    assert JobState(data["state"]) is job.state
    assert JobError.from_json(data["error"]) == job.error
    assert tuple(AttemptRecord.from_json(record) for record in data["history"]) == job.history


def test_job_to_json_writes_unset_values_as_null() -> None:
    job = dataclasses.replace(
        full_job(),
        lease_owner=None,
        lease_expires_at=None,
        attempted_at=None,
        finished_at=None,
        result=None,
        error=None,
        history=(),
    )

    data = job.to_json()

    assert data["lease_expires_at"] is None
    assert data["attempted_at"] is None
    assert data["finished_at"] is None
    assert data["error"] is None
    assert data["history"] == []


@pytest.mark.parametrize("state", list(JobState))
def test_a_job_is_finished_only_in_a_final_state(state: JobState) -> None:
    job = dataclasses.replace(full_job(), state=state)

    assert job.finished is (state in {JobState.SUCCEEDED, JobState.DEAD, JobState.CANCELLED})
    assert job.finished is (state in FINISHED_STATES)


@pytest.mark.parametrize(
    "record",
    [
        AttemptRecord(attempt=1, worker="w#1", started_at=T0, ended_at=T0 + timedelta(seconds=2), outcome=Outcome.LOST),
        AttemptRecord(
            attempt=3,
            worker=None,
            started_at=None,
            ended_at=T0,
            outcome=Outcome.FAILED,
            error=JobError(type="TimeoutError", message="took too long"),
        ),
        AttemptRecord(attempt=2, worker="w#2", started_at=T0, ended_at=T0, outcome=Outcome.RELEASED, error=ERROR),
    ],
    ids=["no-error", "no-start-no-traceback", "with-traceback"],
)
def test_attempt_record_round_trips_through_json_text(record: AttemptRecord) -> None:
    text = json.dumps(record.to_json())

    assert AttemptRecord.from_json(json.loads(text)) == record


def test_attempt_record_timestamps_keep_their_zone() -> None:
    record = AttemptRecord(attempt=1, worker="w", started_at=T0, ended_at=T0, outcome=Outcome.SUCCEEDED)

    again = AttemptRecord.from_json(json.loads(json.dumps(record.to_json())))

    assert again.ended_at.utcoffset() == timedelta(0)
    assert again.started_at is not None
    assert again.started_at.utcoffset() == timedelta(0)


def test_job_error_from_empty_data_is_none() -> None:
    assert JobError.from_json(None) is None
    assert JobError.from_json({}) is None
    assert JobError.from_json({"type": "E", "message": "m"}) == JobError(type="E", message="m", traceback=None)


def test_job_ids_sort_by_creation() -> None:
    ids = [new_job_id() for _ in range(1_000)]

    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)


def test_jobs_built_the_fast_way_are_the_frozen_dataclasses_they_claim_to_be() -> None:
    job = full_job()

    assert type(job) is Job
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.state = JobState.DEAD  # ty: ignore[invalid-assignment]
    assert job == dataclasses.replace(job)
    changed = dataclasses.replace(job, state=JobState.DEAD, attempt=3)
    assert (type(changed), changed.state, changed.attempt, changed.id) == (Job, JobState.DEAD, 3, job.id)
    assert job.state is JobState.RETRYING


def test_new_jobs_keep_their_defaults_and_refuse_missing_fields() -> None:
    first, second = NewJob(task="a", args=[], kwargs={}), NewJob("a", [], {})

    assert type(first) is NewJob
    assert first.id != second.id
    assert (first.queue, first.max_attempts, first.run_at) == ("default", 5, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.queue = "other"  # ty: ignore[invalid-assignment]
    with pytest.raises(TypeError, match="kwargs"):
        NewJob(task="a", args=[])  # ty: ignore[missing-argument]


def test_the_fast_constructor_builds_the_same_frozen_job_as_the_class() -> None:
    build = fast_constructor(NewJob)

    fast, slow = build("a", [1], {"b": 2}, "q"), NewJob("a", [1], {"b": 2}, "q")

    assert type(fast) is NewJob
    assert fast.id != slow.id, "each gets its own id"
    assert fast == dataclasses.replace(slow, id=fast.id)
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.queue = "other"  # ty: ignore[invalid-assignment]
    with pytest.raises(TypeError, match="kwargs"):
        build("a", [])
