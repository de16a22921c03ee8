"""Real worker processes sharing one SQLite file: crashes, signals and load."""

from __future__ import annotations

import collections
import signal
import sys
from collections.abc import Awaitable, Iterator
from pathlib import Path

import pytest
from tests.support import tasks as support
from tests.support.processes import WorkerProcess
from tests.support.waiting import eventually

from conveyor import Conveyor, JobState, Outcome
from conveyor.testing import enqueued_jobs

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def workers(tmp_path: Path, database_url: str) -> Iterator[list[WorkerProcess]]:
    """Worker processes started by the test; any left running are killed at the end."""
    started: list[WorkerProcess] = []
    yield started
    for worker in started:
        worker.kill()


def start_worker(workers: list[WorkerProcess], tmp_path: Path, database_url: str, **settings: str) -> WorkerProcess:
    worker = WorkerProcess(tmp_path / f"worker-{len(workers)}.log", database_url, **settings)
    workers.append(worker)
    worker.wait_started()
    return worker


async def counted(app: Conveyor, state: JobState) -> int:
    return sum(stats.counts.get(state, 0) for stats in await app.queue_stats())


async def test_a_thousand_bulk_jobs_run_exactly_once_across_two_worker_processes(
    tmp_path: Path, database_url: str, effects_path: Path, workers: list[WorkerProcess], app: Conveyor
) -> None:
    effect = app.task(name="effect")(support.effect.fn)
    first = start_worker(workers, tmp_path, database_url, concurrency="20", poll_interval_seconds="0.05")
    second = start_worker(workers, tmp_path, database_url, concurrency="20", poll_interval_seconds="0.05")
    jobs = await app.enqueue_many([effect.job(n) for n in range(1_000)])
    assert len({job.id for job in jobs}) == 1_000

    await eventually(lambda: _equals(counted(app, JobState.SUCCEEDED), 1_000), timeout=120)
    assert first.stop() == 0
    assert second.stop() == 0

    lines = support.read_effects(effects_path)
    runs = collections.Counter(line.split()[0] for line in lines)
    assert len(lines) == 1_000, "every job ran, and none twice"
    assert set(runs) == {job.id for job in jobs}
    assert max(runs.values()) == 1
    finished = await enqueued_jobs(app, "effect")
    assert {job.attempt for job in finished} == {1}
    workers_used = {job.history[0].worker.split("#")[0] for job in finished if job.history[0].worker}
    assert len(workers_used) == 2, "both processes took a share"


async def _equals(value_coroutine: Awaitable[int], expected: int) -> bool:
    return (await value_coroutine) == expected


async def test_jobs_of_a_sigkilled_worker_are_finished_by_another_once_the_lease_expires(
    tmp_path: Path, database_url: str, effects_path: Path, workers: list[WorkerProcess], app: Conveyor
) -> None:
    marker = tmp_path / "go"
    until_marker = app.task(name="until_marker")(support.until_marker.fn)
    jobs = await app.enqueue_many([until_marker.job(str(marker)) for _ in range(5)])

    doomed = start_worker(workers, tmp_path, database_url, lease_seconds="1")
    await eventually(lambda: _started_count(effects_path, 5))
    doomed.process.send_signal(signal.SIGKILL)
    doomed.process.wait(10)
    held = [await app.get_job(job.id) for job in jobs]
    assert {job.state for job in held} == {JobState.RUNNING}, "the dead worker still holds every lease"

    marker.touch()
    rescuer = start_worker(workers, tmp_path, database_url, lease_seconds="1")
    await eventually(lambda: _equals(counted(app, JobState.SUCCEEDED), 5), timeout=60)
    assert rescuer.stop() == 0

    lines = support.read_effects(effects_path)
    done = collections.Counter(line.split()[1] for line in lines if line.startswith("done"))
    assert done == dict.fromkeys((job.id for job in jobs), 1), "each job finished exactly once"
    for job in [await app.get_job(job.id) for job in jobs]:
        assert job.attempt == 2
        assert [record.outcome for record in job.history] == [Outcome.LOST, Outcome.SUCCEEDED]


async def _started_count(effects_path: Path, expected: int) -> bool:
    return sum(line.startswith("start") for line in support.read_effects(effects_path)) >= expected


async def test_sigterm_finishes_short_jobs_and_hands_back_long_ones_without_burning_attempts(
    tmp_path: Path, database_url: str, effects_path: Path, workers: list[WorkerProcess], app: Conveyor
) -> None:
    marker = tmp_path / "go"
    slow_effect = app.task(name="slow_effect")(support.slow_effect.fn)
    until_marker = app.task(name="until_marker")(support.until_marker.fn)
    short = await app.enqueue_many([slow_effect.job(0.5) for _ in range(3)])
    long = await app.enqueue_many([until_marker.job(str(marker)) for _ in range(3)])

    draining = start_worker(workers, tmp_path, database_url, shutdown_grace_seconds="3")
    await eventually(lambda: _started_count(effects_path, 6))
    draining.process.send_signal(signal.SIGTERM)
    assert draining.process.wait(30) == 0
    draining.stop()

    for job in [await app.get_job(job.id) for job in short]:
        assert (job.state, job.attempt) == (JobState.SUCCEEDED, 1), "short jobs finished within the grace period"
    for job in [await app.get_job(job.id) for job in long]:
        assert (job.state, job.attempt, job.lease_owner) == (JobState.QUEUED, 0, None)
        assert [record.outcome for record in job.history] == [Outcome.RELEASED]
    events = [event.get("event") for event in draining.events()]
    assert "worker.signal" in events
    assert events[-1] == "worker.stopped"

    marker.touch()
    finisher = start_worker(workers, tmp_path, database_url)
    await eventually(lambda: _equals(counted(app, JobState.SUCCEEDED), 6), timeout=60)
    assert finisher.stop() == 0
    for job in [await app.get_job(job.id) for job in long]:
        assert job.attempt == 1, "the handed-back attempt was not counted"
        assert [record.outcome for record in job.history] == [Outcome.RELEASED, Outcome.SUCCEEDED]
    done = collections.Counter(
        line.split()[1] for line in support.read_effects(effects_path) if line.startswith("done")
    )
    assert set(done.values()) == {1}
    assert len(done) == 6


async def test_a_crashing_cpu_task_does_not_take_the_worker_process_down(
    tmp_path: Path, database_url: str, workers: list[WorkerProcess], app: Conveyor
) -> None:
    crash = app.task(name="cpu_crash", cpu=True, max_attempts=2)(support.cpu_crash.fn)
    square = app.task(name="cpu_square", cpu=True)(support.cpu_square.fn)
    crashed = await crash.enqueue()
    worker = start_worker(workers, tmp_path, database_url)
    crashed_final = await app.wait_for_job(crashed.id, timeout=60)
    after = await square.enqueue(12)
    after_final = await app.wait_for_job(after.id, timeout=60)

    assert worker.process.poll() is None, "the worker process is still running"
    assert (crashed_final.state, crashed_final.attempt) == (JobState.DEAD, 2)
    assert after_final.result == 144
    assert worker.stop() == 0


@pytest.mark.parametrize("backend_url", ["sqlite"], indirect=True)
@pytest.mark.skipif(sys.platform != "linux", reason="inotify is Linux's; elsewhere SQLite workers only poll")
async def test_an_idle_sqlite_worker_starts_another_processs_jobs_without_waiting_for_its_poll(
    tmp_path: Path, database_url: str, workers: list[WorkerProcess], app: Conveyor
) -> None:
    noop = app.task(name="noop")(support.noop.fn)
    start_worker(workers, tmp_path, database_url, poll_interval_seconds="60")

    for n in range(3):
        # Each after the last has finished: the worker has looked for jobs and found none, and
        # sleeps for a minute unless the commit wakes it.
        job = await app.wait_for_job((await noop.enqueue(n)).id, timeout=20)
        assert job.state is JobState.SUCCEEDED
