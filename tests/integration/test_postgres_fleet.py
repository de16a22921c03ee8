"""PostgreSQL as the engine of a fleet: many worker processes, instant wake-ups."""

from __future__ import annotations

import asyncio
import collections
from pathlib import Path

import pytest
from tests.support import postgres
from tests.support import tasks as support
from tests.support.processes import WorkerProcess
from tests.support.waiting import eventually

from conveyor import Conveyor, JobState, Outcome
from conveyor.jobs import Ack, AttemptRecord
from conveyor.storage.postgres import LISTENER_APPLICATION_NAME

pytestmark = [pytest.mark.integration, pytest.mark.postgres]


@pytest.fixture
def pg_url(postgres_database: str) -> str:
    postgres.run_sync(postgres.truncate(postgres_database))
    return postgres_database


@pytest.mark.slow
async def test_four_worker_processes_run_five_thousand_jobs_exactly_once(
    tmp_path: Path, pg_url: str, effects_path: Path, fleet: list[WorkerProcess]
) -> None:
    app = Conveyor(database_url=pg_url)
    effect = app.task(name="effect")(support.effect.fn)
    try:
        fleet.extend(WorkerProcess(tmp_path / f"worker-{index}.log", pg_url, concurrency="25") for index in range(4))
        for worker in fleet:
            worker.wait_started()
        jobs = []
        for start in range(0, 5_000, 1_000):
            jobs += await app.enqueue_many([effect.job(n) for n in range(start, start + 1_000)])

        async def all_succeeded() -> bool:
            stats = await app.queue_stats()
            return sum(queue.counts.get(JobState.SUCCEEDED, 0) for queue in stats) == 5_000

        await eventually(all_succeeded, timeout=240, interval=0.2)
        assert [worker.stop() for worker in fleet] == [0, 0, 0, 0]
    finally:
        await app.close()

    runs = collections.Counter(line.split()[0] for line in support.read_effects(effects_path))
    assert len(runs) == 5_000
    assert set(runs.values()) == {1}, "no job ran twice"
    assert set(runs) == {job.id for job in jobs}
    for worker in fleet:
        levels = collections.Counter(event.get("level") for event in worker.events())
        assert levels["error"] == 0, worker.log_path.read_text()[-3000:]
        assert "deadlock" not in worker.log_path.read_text().lower()
        assert any(event.get("event") == "job.succeeded" for event in worker.events()), "every worker took a share"


async def test_a_notified_worker_starts_long_before_the_polling_fallback(
    tmp_path: Path, pg_url: str, fleet: list[WorkerProcess]
) -> None:
    worker = WorkerProcess(tmp_path / "worker.log", pg_url, poll_interval_seconds="60")
    fleet.append(worker)
    worker.wait_started()
    app = Conveyor(database_url=pg_url)
    noop = app.task(name="noop")(support.noop.fn)
    try:
        await eventually(lambda: _listening(pg_url), timeout=30)
        job = await noop.enqueue(7)
        finished = await app.wait_for_job(job.id, timeout=15)
    finally:
        await app.close()
    assert finished.state is JobState.SUCCEEDED, "woken by NOTIFY, not by the 60 s poll"
    assert worker.stop() == 0


async def _listening(url: str) -> bool:
    import asyncpg  # noqa: PLC0415 - test-only look at the server's state

    connection = await asyncpg.connect(url, timeout=5)
    try:
        count = await connection.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND application_name = $1",
            LISTENER_APPLICATION_NAME,
        )
    finally:
        await connection.close()
    return count > 0


async def test_a_finish_in_one_process_is_announced_to_listeners_in_another(pg_url: str) -> None:
    """The long-poll's wake-up on PostgreSQL: NOTIFY on the ack, not per-request polling."""
    from conveyor.settings import Settings  # noqa: PLC0415
    from conveyor.storage import open_store  # noqa: PLC0415

    watching = await open_store(Settings(database_url=pg_url))
    acking = await open_store(Settings(database_url=pg_url))
    announced: asyncio.Queue[set[str]] = asyncio.Queue()
    try:
        watching.on_jobs_finished(announced.put_nowait)
        app = Conveyor(database_url=pg_url)
        noop = app.task(name="noop")(support.noop.fn)
        job = noop.job(1)
        now = app.clock()
        await acking.insert_jobs([job], now=now)
        await eventually(lambda: _listening(pg_url), timeout=30)
        (claimed,) = await acking.fetch_jobs(queues=["default"], limit=1, lease_owner="w#1", lease_seconds=30, now=now)
        record = AttemptRecord(attempt=1, worker="w", started_at=now, ended_at=now, outcome=Outcome.SUCCEEDED)
        ack = Ack(job_id=claimed.id, lease_owner="w#1", state=JobState.SUCCEEDED, record=record, result=1)
        assert await acking.ack_jobs([ack], now=now) == {job.id}
        assert await asyncio.wait_for(announced.get(), 10) == {job.id}
        await app.close()
    finally:
        await watching.close()
        await acking.close()
