"""What runs inside a CPU task's process, exercised here in-process (the pool's side is in test_worker)."""

from __future__ import annotations

from conveyor.context import JobContext
from conveyor.engine.cpu import run_in_child

CONTEXT = JobContext(job_id="job-1", task="t", queue="default", attempt=1, max_attempts=3)


def test_the_child_finds_the_task_by_its_definition_and_returns_a_json_result() -> None:
    status, payload = run_in_child("tests.support.tasks", "cpu_square", [7], {}, CONTEXT)
    assert (status, payload) == ("ok", 49)


def test_the_child_reports_a_failure_as_data_with_whether_it_may_be_retried() -> None:
    status, (error, retryable) = run_in_child("conveyor.examples", "fibonacci", [-1], {}, CONTEXT)
    assert status == "error"
    assert error["type"] == "PermanentError"
    assert "negative" in error["message"]
    assert "Traceback" in error["traceback"]
    assert retryable is False


def test_bad_stored_arguments_fail_in_the_child_without_retry() -> None:
    status, (error, retryable) = run_in_child("tests.support.tasks", "cpu_square", ["not a number"], {}, CONTEXT)
    assert status == "error"
    assert error["type"] == "TaskArgumentsError"
    assert retryable is False
