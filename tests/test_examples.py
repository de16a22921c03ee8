"""The bundled example tasks behave as the quick start says."""

from __future__ import annotations

import pytest

from conveyor import Conveyor, JobState, PermanentError, examples
from conveyor.testing import drain


async def test_every_example_task_runs_on_a_worker(app: Conveyor) -> None:
    for task in examples.app.tasks.values():
        app.task(name=task.name, cpu=task.options.cpu, max_attempts=task.options.max_attempts)(task.fn)
    jobs = [
        await app.enqueue("add", [2, 3]),
        await app.enqueue("sleep", [0.01]),
        await app.enqueue("word_count", ["three little words"]),
        await app.enqueue("fibonacci", [20]),
        await app.enqueue("flaky", kwargs={"failure_rate": 0.0}),
    ]

    await drain(app)

    results = [(await app.get_job(job.id)) for job in jobs]
    assert [job.state for job in results] == [JobState.SUCCEEDED] * 5
    assert [job.result for job in results] == [5, 0.01, 3, 6765, "heads"]


async def test_flaky_fails_when_the_coin_always_comes_up_tails() -> None:
    with pytest.raises(RuntimeError, match="tails"):
        await examples.flaky.fn(failure_rate=1.0, ctx=examples.JobContext("id", "flaky", "default", 1, 3))


def test_fibonacci_refuses_negative_input_permanently() -> None:
    with pytest.raises(PermanentError):
        examples.fibonacci(-1)
