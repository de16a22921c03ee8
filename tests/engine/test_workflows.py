"""Workflows on both backends: results pass along chains, groups keep order, chords fire once."""

from __future__ import annotations

import collections
from collections.abc import AsyncIterator

import pytest

from conveyor import (
    Conveyor,
    JobState,
    JobStateError,
    TaskArgumentsError,
    WorkflowNotFoundError,
    WorkflowState,
    chain,
    chord,
    group,
)
from conveyor.testing import drain

Flow = tuple[Conveyor, collections.Counter[str]]


@pytest.fixture
async def flow(database_url: str) -> AsyncIterator[Flow]:
    """An app with the workflow test tasks, and a count of some tasks' calls; closed afterwards."""
    app, calls = make_app(database_url)
    yield app, calls
    await app.close()


def make_app(database_url: str) -> Flow:
    app = Conveyor(database_url=database_url, poll_interval_seconds=0.05, max_attempts=1)
    calls: collections.Counter[str] = collections.Counter()

    @app.task
    async def add(x: int, y: int) -> int:
        calls["add"] += 1
        return x + y

    @app.task
    async def square(x: int) -> int:
        return x * x

    @app.task
    async def total(values: list[int]) -> int:
        calls["total"] += 1
        return sum(values)

    @app.task
    async def pair(values: list[int], label: str) -> dict[str, object]:
        return {"label": label, "values": values}

    @app.task
    async def fragile(x: int) -> int:
        if calls["fragile_ok"] == 0:
            calls["fragile_failed"] += 1
            raise RuntimeError("not yet")
        return x

    @app.task
    async def constant() -> str:
        return "fixed"

    return app, calls


async def test_a_chain_passes_each_result_to_the_next_step(flow: Flow) -> None:
    app, _ = flow
    add = app.tasks["add"]
    workflow = await app.enqueue_workflow(chain(add.step(1, 2), add.step(10), add.step(100)))
    assert [job.state for job in workflow.jobs] == [JobState.QUEUED, JobState.WAITING, JobState.WAITING]

    await drain(app)

    done = await app.get_workflow(workflow.id)
    assert done.state is WorkflowState.SUCCEEDED
    assert [job.result for job in done.jobs] == [3, 13, 113]
    assert [job.args for job in done.jobs] == [[1, 2], [3, 10], [13, 100]]
    assert done.result == 113


async def test_a_group_of_100_returns_the_results_in_member_order(flow: Flow) -> None:
    app, _ = flow
    square = app.tasks["square"]
    workflow = await group(square.step(number) for number in range(100)).enqueue()

    await drain(app)

    done = await app.get_workflow(workflow.id)
    assert done.state is WorkflowState.SUCCEEDED
    assert done.result == [number * number for number in range(100)]


async def test_a_chord_over_500_members_fires_its_callback_exactly_once_with_every_result(flow: Flow) -> None:
    app, calls = flow
    square, total = app.tasks["square"], app.tasks["total"]
    workflow = await chord((square.step(number) for number in range(500)), total.step()).enqueue()

    await drain(app, concurrency=50)

    done = await app.get_workflow(workflow.id)
    assert done.state is WorkflowState.SUCCEEDED
    assert calls["total"] == 1
    assert done.result == sum(number * number for number in range(500))
    callback = done.jobs[-1]
    assert callback.args == [[number * number for number in range(500)]]


async def test_nested_workflows_complete_with_results_shaped_like_the_tree(flow: Flow) -> None:
    app, _ = flow
    add, square, total, pair = (app.tasks[name] for name in ("add", "square", "total", "pair"))
    workflow = await app.enqueue_workflow(
        chain(
            add.step(1, 2),  # 3
            group(
                add.step(10),  # 13
                chain(add.step(20), add.step(300)),  # 23, then 323
                chord([square.step(), add.step(1)], total.step()),  # 9 and 4, then 13
            ),
            pair.step(label="done"),
        ),
        name="nested",
    )
    groups_in_a_group = await group(group(square.step(2), square.step(3)), square.step(4)).enqueue()

    await drain(app)

    done = await app.get_workflow(workflow.id)
    assert (done.name, done.state) == ("nested", WorkflowState.SUCCEEDED)
    assert done.result == {"label": "done", "values": [13, 323, 13]}
    assert [job.task for job in done.jobs] == ["add", "add", "add", "add", "square", "add", "total", "pair"]
    assert (await app.get_workflow(groups_in_a_group.id)).result == [[4, 9], 16]


async def test_a_dead_member_cancels_its_dependents_and_replaying_it_resumes_the_workflow(flow: Flow) -> None:
    app, calls = flow
    square, fragile, total, constant = (app.tasks[name] for name in ("square", "fragile", "total", "constant"))
    workflow = await app.enqueue_workflow(
        group(
            chord([square.step(1), fragile.step(5), square.step(2)], chain(total.step(), square.step())),
            constant.step(),  # independent of the failure: runs anyway
        )
    )

    await drain(app)

    failed = await app.get_workflow(workflow.id)
    assert failed.state is WorkflowState.FAILED
    assert failed.finished, "nothing is left waiting"
    states = {job.task + str(index): job.state for index, job in enumerate(failed.jobs)}
    assert states == {
        "square0": JobState.SUCCEEDED,
        "fragile1": JobState.DEAD,
        "square2": JobState.SUCCEEDED,
        "total3": JobState.CANCELLED,
        "square4": JobState.CANCELLED,
        "constant5": JobState.SUCCEEDED,
    }
    dead = failed.jobs[1]
    for dependent in failed.jobs[3:5]:
        assert dependent.error is not None
        assert dependent.error.type == "DependencyFailed"
        assert dead.id in dependent.error.message

    calls["fragile_ok"] = 1
    await app.retry_job(dead.id)
    resumed = await app.get_workflow(workflow.id)
    assert resumed.state is WorkflowState.RUNNING
    assert [job.state for job in resumed.jobs[3:5]] == [JobState.WAITING, JobState.WAITING]
    await drain(app)

    done = await app.get_workflow(workflow.id)
    assert done.state is WorkflowState.SUCCEEDED
    assert done.result == [(1 + 5 + 4) ** 2, "fixed"]
    assert calls["fragile_failed"] == 1


async def test_a_step_cancelled_by_its_failed_dependency_cannot_be_replayed_on_its_own(flow: Flow) -> None:
    app, _ = flow
    fragile, square = app.tasks["fragile"], app.tasks["square"]
    workflow = await chain(fragile.step(3), square.step()).enqueue()
    await drain(app)
    waiting_step = (await app.get_workflow(workflow.id)).jobs[1]

    with pytest.raises(JobStateError, match="waits for another job of its workflow"):
        await app.retry_job(waiting_step.id)


async def test_cancelling_a_waiting_step_cancels_what_waits_on_it(flow: Flow) -> None:
    app, _ = flow
    add, square = app.tasks["add"], app.tasks["square"]
    workflow = await chain(add.step(1, 1), square.step(), square.step()).enqueue()
    middle = workflow.jobs[1]

    await app.cancel_job(middle.id)
    await drain(app)

    done = await app.get_workflow(workflow.id)
    assert [job.state for job in done.jobs] == [JobState.SUCCEEDED, JobState.CANCELLED, JobState.CANCELLED]
    assert done.state is WorkflowState.CANCELLED
    assert done.finished


async def test_every_problem_in_every_step_is_reported_at_once_and_nothing_is_stored(flow: Flow) -> None:
    app, _ = flow
    add, square, total = app.tasks["add"], app.tasks["square"], app.tasks["total"]
    with pytest.raises(TaskArgumentsError) as caught:
        await app.enqueue_workflow(chain(add.step(1, "two"), group(square.step(), square.step(1)), total.step(extra=1)))
    problems = caught.value.problems
    assert any(problem.startswith("chain[0] (add): y") for problem in problems), problems
    assert any(problem.startswith("chain[1].group[1] (square)") for problem in problems), problems
    assert any(problem.startswith("chain[2] (total)") and "extra" in problem for problem in problems), problems
    assert (await app.list_jobs()).jobs == []


async def test_a_step_after_an_empty_group_receives_an_empty_list(flow: Flow) -> None:
    app, _ = flow
    square, total = app.tasks["square"], app.tasks["total"]
    workflow = await chain(square.step(3), chord([], total.step())).enqueue()
    await drain(app)

    done = await app.get_workflow(workflow.id)
    assert done.state is WorkflowState.SUCCEEDED
    assert done.result == 0
    assert done.jobs[-1].args == [[]]


async def test_pruning_keeps_the_finished_steps_of_an_unfinished_workflow_and_then_forgets_it(flow: Flow) -> None:
    app, _ = flow
    add, square = app.tasks["add"], app.tasks["square"]
    workflow = await chain(add.step(1, 2), square.step()).enqueue()
    await drain(app, concurrency=1)
    first, second = (await app.get_workflow(workflow.id)).jobs
    assert (first.state, second.state) == (JobState.SUCCEEDED, JobState.SUCCEEDED)
    unfinished = await chain(add.step(2, 2), square.using(delay=3600).step()).enqueue()
    await drain(app)

    pruned = await app.prune(older_than=0)

    assert pruned == 2, "the finished workflow's two jobs, not the unfinished one's first step"
    with pytest.raises(WorkflowNotFoundError):
        await app.get_workflow(workflow.id)
    kept = await app.get_workflow(unfinished.id)
    assert [job.state for job in kept.jobs] == [JobState.SUCCEEDED, JobState.SCHEDULED]


async def test_replaying_a_step_cancelled_before_its_turn_waits_for_its_dependency_then_gets_its_input(
    flow: Flow,
) -> None:
    app, _ = flow
    add = app.tasks["add"]
    workflow = await chain(add.step(1, 1), add.step(10), add.step(100)).enqueue()
    _, second, third = workflow.jobs
    await app.cancel_job(second.id)
    assert (await app.get_job(third.id)).state is JobState.CANCELLED

    replayed = await app.retry_job(second.id)
    assert (replayed.state, replayed.waiting_on) == (JobState.WAITING, 1), "its dependency has not run yet"
    await drain(app)

    done = await app.get_workflow(workflow.id)
    assert (done.state, done.result) == (WorkflowState.SUCCEEDED, 112)


async def test_replaying_a_cancelled_step_whose_dependency_already_succeeded_starts_it_with_that_result(
    flow: Flow,
) -> None:
    app, _ = flow
    add = app.tasks["add"]
    workflow = await chain(add.step(1, 1), add.step(10), add.step(100)).enqueue()
    await app.cancel_job(workflow.jobs[1].id)
    await drain(app)
    assert [job.state for job in (await app.get_workflow(workflow.id)).jobs] == [
        JobState.SUCCEEDED,
        JobState.CANCELLED,
        JobState.CANCELLED,
    ]

    replayed = await app.retry_job(workflow.jobs[1].id)
    assert (replayed.state, replayed.args) == (JobState.QUEUED, [2, 10])
    await drain(app)

    done = await app.get_workflow(workflow.id)
    assert (done.state, done.result) == (WorkflowState.SUCCEEDED, 112)
