"""Workflows across real worker processes: members acked by many processes at once, and a worker
SIGKILLed in the middle of a chord; either way the callback runs exactly once."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.support import tasks as support
from tests.support.processes import WorkerProcess
from tests.support.waiting import eventually

from conveyor import Conveyor, JobState, Outcome, WorkflowState, chord

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def workers() -> Iterator[list[WorkerProcess]]:
    started: list[WorkerProcess] = []
    yield started
    for worker in started:
        worker.kill()


async def test_a_worker_killed_mid_chord_leaves_no_stranded_workflow_and_the_callback_runs_once(
    tmp_path: Path, database_url: str, effects_path: Path, workers: list[WorkerProcess], app: Conveyor
) -> None:
    marker = tmp_path / "go"
    effect = app.task(name="effect")(support.effect.fn)
    until_marker = app.task(name="until_marker")(support.until_marker.fn)
    collect = app.task(name="collect")(support.collect.fn)
    quick = [effect.step(number) for number in range(30)]
    held = [until_marker.step(str(marker)) for _ in range(4)]
    workflow = await chord([*quick, *held], collect.step()).enqueue()

    doomed = WorkerProcess(tmp_path / "doomed.log", database_url, concurrency="40", lease_seconds="1")
    workers.append(doomed)
    doomed.wait_started()

    async def quick_ones_acked_and_held_ones_started() -> bool:
        current = await app.get_workflow(workflow.id)
        states = [job.state for job in current.jobs]
        return states[:30] == [JobState.SUCCEEDED] * 30 and states[30:34] == [JobState.RUNNING] * 4

    await eventually(quick_ones_acked_and_held_ones_started, timeout=60)
    doomed.process.send_signal(signal.SIGKILL)
    doomed.process.wait(10)
    mid_chord = await app.get_workflow(workflow.id)
    assert mid_chord.jobs[-1].state is JobState.WAITING
    assert mid_chord.jobs[-1].waiting_on == 4, "the 30 acked members were counted off; the 4 held ones were not"

    marker.touch()
    rescuer = WorkerProcess(tmp_path / "rescuer.log", database_url, lease_seconds="1")
    workers.append(rescuer)
    rescuer.wait_started()

    async def finished() -> bool:
        return (await app.get_workflow(workflow.id)).finished

    await eventually(finished, timeout=60)
    assert rescuer.stop() == 0

    done = await app.get_workflow(workflow.id)
    assert done.state is WorkflowState.SUCCEEDED
    assert done.result == 34
    callbacks = [line for line in support.read_effects(effects_path) if line.startswith("collect")]
    assert callbacks == [f"collect {done.jobs[-1].id} 34"], "the callback ran exactly once, with every result"
    for member in done.jobs[30:34]:
        assert [record.outcome for record in member.history] == [Outcome.LOST, Outcome.SUCCEEDED]


async def test_a_chord_whose_members_three_processes_ack_at_once_fires_its_callback_once(
    tmp_path: Path, database_url: str, effects_path: Path, workers: list[WorkerProcess], app: Conveyor
) -> None:
    effect = app.task(name="effect")(support.effect.fn)
    collect = app.task(name="collect")(support.collect.fn)
    workers.extend(
        WorkerProcess(tmp_path / f"worker-{index}.log", database_url, concurrency="20") for index in range(3)
    )
    for worker in workers:
        worker.wait_started()
    workflow = await chord([effect.step(number) for number in range(500)], collect.step()).enqueue()

    async def finished() -> bool:
        return (await app.get_workflow(workflow.id)).finished

    await eventually(finished, timeout=120)
    for worker in workers:
        assert worker.stop() == 0

    done = await app.get_workflow(workflow.id)
    assert (done.state, done.result) == (WorkflowState.SUCCEEDED, 500)
    lines = support.read_effects(effects_path)
    assert [line for line in lines if line.startswith("collect")] == [f"collect {done.jobs[-1].id} 500"]
    assert len([line for line in lines if not line.startswith("collect")]) == 500, "each member ran once"
    ackers = {job.history[-1].worker.split("#")[0] for job in done.jobs[:500] if job.history[-1].worker}
    assert len(ackers) >= 2, "the members' acks came from more than one process"
