from __future__ import annotations

import asyncio
import collections
import sqlite3
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from tests.engine.conftest import lingering_task, running_worker
from tests.support import tasks as support
from tests.support.waiting import settle

from conveyor import (
    CONTEXT,
    Conveyor,
    Exponential,
    JobContext,
    JobState,
    Outcome,
    PermanentError,
    Worker,
    chain,
    constant,
)
from conveyor.jobs import NewJob
from conveyor.testing import drain


async def test_async_sync_and_cpu_tasks_all_run_to_success(app: Conveyor) -> None:
    @app.task
    async def add(a: int, b: int) -> int:
        return a + b

    @app.task
    def thread_name() -> str:
        return threading.current_thread().name

    cpu = app.task(name="square", cpu=True)(support.cpu_square.fn)
    jobs = [await add.enqueue(2, 3), await thread_name.enqueue(), await cpu.enqueue(7)]

    stats = await drain(app)

    done = [await app.get_job(job.id) for job in jobs]
    assert [job.state for job in done] == [JobState.SUCCEEDED] * 3
    assert done[0].result == 5
    assert done[1].result.startswith("conveyor-task"), "sync tasks run in the worker's thread pool"
    assert done[2].result == 49
    assert stats.claimed == 3
    assert all(job.attempt == 1 and job.history[0].outcome is Outcome.SUCCEEDED for job in done)


async def test_a_task_asking_for_a_context_gets_its_job_identity(app: Conveyor) -> None:
    seen: list[JobContext] = []

    @app.task
    async def introspect(value: int, ctx: JobContext = CONTEXT) -> int:
        seen.append(ctx)
        return value

    job = await introspect.using(correlation_id="req-42").enqueue(1)
    await drain(app)

    (ctx,) = seen
    assert (ctx.job_id, ctx.task, ctx.attempt, ctx.correlation_id) == (job.id, "introspect", 1, "req-42")
    assert ctx.is_last_attempt is False


async def test_retries_follow_the_backoff_schedule_and_end_dead_with_the_error_kept(app: Conveyor) -> None:
    asked: list[int] = []

    def doubling(attempt: int) -> float:
        asked.append(attempt)
        return 0.05 * 2 ** (attempt - 1)

    @app.task(max_attempts=3, backoff=doubling)
    async def broken() -> None:
        raise ValueError("the upstream said no")

    job = await broken.enqueue()
    async with running_worker(app):
        final = await app.wait_for_job(job.id, timeout=30)

    assert final.state is JobState.DEAD
    assert final.attempt == 3
    assert asked == [1, 2], "a backoff is computed after every failure but the last"
    assert final.error is not None
    assert (final.error.type, final.error.message) == ("ValueError", "the upstream said no")
    assert final.error.traceback is not None
    assert "the upstream said no" in final.error.traceback
    assert [record.outcome for record in final.history] == [Outcome.FAILED] * 3
    for attempt in (1, 2):
        previous, following = final.history[attempt - 1], final.history[attempt]
        assert following.started_at is not None
        waited = following.started_at - previous.ended_at
        assert waited >= timedelta(seconds=0.05 * 2 ** (attempt - 1)), f"retry {attempt} came too early"


async def test_permanent_error_goes_dead_at_once(app: Conveyor) -> None:
    @app.task(max_attempts=5)
    async def hopeless() -> None:
        raise PermanentError("bad input, retrying cannot help")

    job = await hopeless.enqueue()
    await drain(app)

    final = await app.get_job(job.id)
    assert (final.state, final.attempt) == (JobState.DEAD, 1)
    assert final.error is not None
    assert final.error.type == "PermanentError"


async def test_only_errors_named_in_retry_on_are_retried(app: Conveyor) -> None:
    @app.task(max_attempts=5, retry_on=ConnectionError, backoff=constant(0))
    async def picky(kind: str) -> None:
        raise ConnectionError(kind) if kind == "transient" else KeyError(kind)

    transient = await picky.using(max_attempts=2).enqueue("transient")
    fatal = await picky.enqueue("fatal")
    async with running_worker(app):
        transient_done = await app.wait_for_job(transient.id, timeout=30)
        fatal_done = await app.wait_for_job(fatal.id, timeout=30)

    assert (transient_done.state, transient_done.attempt) == (JobState.DEAD, 2)
    assert (fatal_done.state, fatal_done.attempt) == (JobState.DEAD, 1)


async def test_a_retried_job_succeeds_once_the_error_goes_away(app: Conveyor) -> None:
    failures = iter([RuntimeError("first"), RuntimeError("second")])

    @app.task(max_attempts=5, backoff=constant(0))
    async def flaky() -> str:
        error = next(failures, None)
        if error:
            raise error
        return "third time lucky"

    job = await flaky.enqueue()
    async with running_worker(app):
        final = await app.wait_for_job(job.id, timeout=30)

    assert (final.state, final.attempt, final.result) == (JobState.SUCCEEDED, 3, "third time lucky")
    assert final.error is None or final.error.message == "second", "the last error stays for the record"
    assert [record.outcome for record in final.history] == [Outcome.FAILED, Outcome.FAILED, Outcome.SUCCEEDED]


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_a_timeout_fails_the_attempt(app: Conveyor, kind: str) -> None:
    release = threading.Event()

    @app.task(name="slow_async", timeout=0.2, max_attempts=1)
    async def slow_async() -> None:
        await asyncio.sleep(30)

    @app.task(name="slow_sync", timeout=0.2, max_attempts=1)
    def slow_sync() -> None:
        release.wait(30)

    task = slow_async if kind == "async" else slow_sync
    job = await task.enqueue()
    try:
        await drain(app)
    finally:
        release.set()

    final = await app.get_job(job.id)
    assert final.state is JobState.DEAD
    assert final.error is not None
    assert final.error.type == "TimeoutError"
    assert "0.2" in final.error.message


async def test_a_cpu_task_past_its_timeout_is_killed_and_the_pool_recovers(app: Conveyor) -> None:
    spin = app.task(name="spin", cpu=True, max_attempts=1, timeout=0.5)(support.cpu_spin.fn)
    square = app.task(name="square", cpu=True)(support.cpu_square.fn)
    stuck = await spin.enqueue(60)
    await drain(app)
    after = await square.enqueue(9)
    await drain(app)

    stuck_final = await app.get_job(stuck.id)
    assert stuck_final.state is JobState.DEAD
    assert stuck_final.error is not None
    assert stuck_final.error.type == "TimeoutError"
    assert (await app.get_job(after.id)).result == 81


async def test_a_crashing_cpu_task_fails_its_attempts_and_the_worker_goes_on(app: Conveyor) -> None:
    crash = app.task(name="crash", cpu=True, max_attempts=2, backoff=constant(0))(support.cpu_crash.fn)
    square = app.task(name="square", cpu=True)(support.cpu_square.fn)
    crashed = await crash.enqueue()
    fine = await square.enqueue(4)

    async with running_worker(app):
        crashed_final = await app.wait_for_job(crashed.id, timeout=60)
        fine_final = await app.wait_for_job(fine.id, timeout=60)
        later = await square.enqueue(5)
        later_final = await app.wait_for_job(later.id, timeout=60)

    assert (crashed_final.state, crashed_final.attempt) == (JobState.DEAD, 2)
    assert crashed_final.error is not None
    assert crashed_final.error.type == "ProcessCrashedError"
    assert fine_final.result == 16
    assert later_final.result == 25


async def test_a_job_for_an_unregistered_task_retries_then_dies(app: Conveyor) -> None:
    store = await app.store()
    (job,) = await store.insert_jobs(
        [NewJob(task="renamed_long_ago", args=[], kwargs={}, max_attempts=2)], now=app.clock()
    )
    async with running_worker(app):
        final = await app.wait_for_job(job.id, timeout=30)

    assert (final.state, final.attempt) == (JobState.DEAD, 2)
    assert final.error is not None
    assert final.error.type == "UnknownTaskError"


async def test_a_result_that_is_not_json_fails_the_job_permanently(app: Conveyor) -> None:
    @app.task(max_attempts=3)
    async def returns_object() -> object:
        return object()

    job = await returns_object.enqueue()
    await drain(app)

    final = await app.get_job(job.id)
    assert (final.state, final.attempt) == (JobState.DEAD, 1)
    assert final.error is not None
    assert "not JSON" in final.error.message


async def test_higher_priority_runs_first(app: Conveyor) -> None:
    order: list[str] = []

    @app.task
    async def mark(label: str) -> None:
        order.append(label)

    await mark.using(priority=0).enqueue("low")
    await mark.using(priority=10).enqueue("high")
    await mark.using(priority=5).enqueue("middle")
    await drain(app, concurrency=1)

    assert order == ["high", "middle", "low"]


async def test_concurrency_is_never_exceeded(app: Conveyor) -> None:
    active = 0
    peak = 0

    @app.task
    async def overlap() -> None:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await asyncio.sleep(0.02)
        active -= 1

    await app.enqueue_many([overlap.job() for _ in range(12)])
    await drain(app, concurrency=3)

    assert peak == 3


async def test_only_the_named_queues_are_served(app: Conveyor) -> None:
    @app.task
    async def where() -> None:
        return None

    mine = await where.using(queue="emails").enqueue()
    other = await where.using(queue="reports").enqueue()
    await drain(app, queues=["emails"])

    assert (await app.get_job(mine.id)).state is JobState.SUCCEEDED
    assert (await app.get_job(other.id)).state is JobState.QUEUED


async def test_an_idle_worker_is_woken_by_an_enqueue_in_the_same_process(database_url: str) -> None:
    app = Conveyor(database_url=database_url, poll_interval_seconds=60)
    started = asyncio.Event()

    @app.task
    async def ping() -> None:
        started.set()

    try:
        async with running_worker(app):
            await asyncio.sleep(0)  # let the worker go idle first
            await ping.enqueue()
            # Far below the 60 s poll: only the wake-up can have started it.
            await asyncio.wait_for(started.wait(), 10)
    finally:
        await app.close()


async def test_an_idle_worker_stops_at_once_when_asked(database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    app = Conveyor(database_url=database_url, poll_interval_seconds=60)
    store = await app.store()
    # Listening before the worker starts: no wake-up of the store's own can end the worker's wait.
    await settle(store)
    waiting = asyncio.Event()
    wait_for_jobs = store.wait_for_jobs

    async def noted_wait(timeout: float) -> None:
        waiting.set()
        await wait_for_jobs(timeout)

    monkeypatch.setattr(store, "wait_for_jobs", noted_wait)
    try:
        worker = Worker(app)
        run = asyncio.create_task(worker.run())
        await asyncio.wait_for(waiting.wait(), 10)

        worker.stop()

        # Far below the 60 s poll: only the stop's wake-up can have ended the wait.
        await asyncio.wait_for(run, 10)
    finally:
        await app.close()


async def test_a_worker_that_took_every_due_job_asks_again_only_on_news(
    postgres_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # PostgreSQL only: SQLite tells a worker of every commit to the file, its own acks included.
    # Jobs come from another app, as from an API process: the worker hears of each by its NOTIFY.
    app, client = (Conveyor(database_url=postgres_database, poll_interval_seconds=60) for _ in range(2))
    store = await app.store()
    spy = _ClaimSpy(store.fetch_jobs)
    monkeypatch.setattr(store, "fetch_jobs", spy)

    for each in (app, client):

        @each.task
        async def ping() -> None:
            pass

    try:
        async with running_worker(app) as worker:
            claims = []
            # The first round is the warm-up: a starting worker also looks once it is listening.
            for round_ in range(1, 5):
                before = spy.calls
                job = await client.get_task("ping").enqueue()
                await client.wait_for_job(job.id, timeout=10, poll=0.005)
                while worker.stats.acked < round_:
                    await asyncio.sleep(0.005)
                for _ in range(20):
                    await asyncio.sleep(0)
                claims.append(spy.calls - before)
    finally:
        await app.close()
        await client.close()

    # One claim per enqueue's wake-up: none after the job was started, none after its ack.
    assert claims[1:] == [1, 1, 1]


@pytest.mark.parametrize("step", ["retry", "workflow"])
async def test_a_job_made_due_by_the_workers_own_ack_runs_without_waiting_for_the_poll(
    database_url: str, step: str
) -> None:
    app = Conveyor(database_url=database_url, poll_interval_seconds=60)
    ran: list[str] = []
    done = asyncio.Event()

    @app.task(max_attempts=2, backoff=constant(0))
    async def first() -> str:
        if step == "retry" and not ran:
            ran.append("failed")
            raise RuntimeError("once")
        ran.append("first")
        if step == "retry":
            done.set()
        return "first"

    @app.task
    async def second(previous: str) -> None:
        ran.append(f"second after {previous}")
        done.set()

    try:
        async with running_worker(app):
            await asyncio.sleep(0)
            if step == "retry":
                await first.enqueue()
            else:
                await app.enqueue_workflow(chain(first.step(), second.step()))
            # Far below the 60 s poll: only the ack's news can have started the next attempt.
            await asyncio.wait_for(done.wait(), 10)
    finally:
        await app.close()

    assert ran == (["failed", "first"] if step == "retry" else ["first", "second after first"])


async def test_a_delayed_job_waits_for_its_time(app: Conveyor) -> None:
    ran = asyncio.Event()

    @app.task
    async def later() -> None:
        ran.set()

    job = await later.using(delay=0.3).enqueue()
    assert job.state is JobState.SCHEDULED
    async with running_worker(app):
        await asyncio.wait_for(ran.wait(), 10)
        final = await app.wait_for_job(job.id, timeout=10)

    assert final.attempted_at is not None
    assert final.attempted_at >= job.run_at


async def test_shutdown_lets_short_jobs_finish_within_the_grace_period(app: Conveyor) -> None:
    entered = asyncio.Event()

    @app.task
    async def short() -> str:
        entered.set()
        await asyncio.sleep(0.2)
        return "finished"

    job = await short.enqueue()
    async with running_worker(app):
        await asyncio.wait_for(entered.wait(), 10)

    final = await app.get_job(job.id)
    assert (final.state, final.result, final.attempt) == (JobState.SUCCEEDED, "finished", 1)


async def test_shutdown_hands_back_jobs_that_outlive_the_grace_period_without_burning_an_attempt(
    database_url: str,
) -> None:
    app = Conveyor(database_url=database_url, shutdown_grace_seconds=0.1, poll_interval_seconds=0.05)
    long_running = lingering_task(app)

    try:
        job = await long_running.task.enqueue()
        async with running_worker(app):
            await asyncio.wait_for(long_running.entered.wait(), 10)

        handed_back = await app.get_job(job.id)
        assert long_running.cleaned_up.is_set(), "the task saw CancelledError and ran its cleanup"
        assert (handed_back.state, handed_back.attempt) == (JobState.QUEUED, 0)
        assert handed_back.lease_owner is None
        assert [record.outcome for record in handed_back.history] == [Outcome.RELEASED]
    finally:
        await app.close()


async def test_a_job_whose_lease_expired_is_rescued_and_run_again(database_url: str) -> None:
    app = Conveyor(database_url=database_url, lease_seconds=0.3, poll_interval_seconds=0.05)

    @app.task
    async def survivor() -> str:
        return "ran"

    try:
        job = await survivor.enqueue()
        store = await app.store()
        # A worker that claimed the job and then vanished: nobody renews this lease.
        (claimed,) = await store.fetch_jobs(
            queues=["default"], limit=1, lease_owner="ghost#1", lease_seconds=0.3, now=app.clock()
        )
        assert claimed.id == job.id
        async with running_worker(app):
            final = await app.wait_for_job(job.id, timeout=30)

        assert (final.state, final.attempt, final.result) == (JobState.SUCCEEDED, 2, "ran")
        assert [record.outcome for record in final.history] == [Outcome.LOST, Outcome.SUCCEEDED]
        assert final.history[0].worker == "ghost#1"
    finally:
        await app.close()


async def test_a_worker_that_loses_its_lease_stops_the_attempt_and_its_late_ack_changes_nothing(
    database_url: str,
) -> None:
    app = Conveyor(database_url=database_url, lease_seconds=0.6, poll_interval_seconds=0.05)
    long_running = lingering_task(app, max_attempts=1)

    try:
        job = await long_running.task.enqueue()
        async with running_worker(app):
            await asyncio.wait_for(long_running.entered.wait(), 10)
            # Another party rescues the job as if this worker's lease had run out.
            rescued = await (await app.store()).rescue_jobs(now=app.clock() + timedelta(hours=1))
            assert [found.id for found in rescued] == [job.id]
            await asyncio.wait_for(long_running.cleaned_up.wait(), 10)

        final = await app.get_job(job.id)
        assert final.state is JobState.DEAD, "out of attempts once the lost attempt counted"
        assert [record.outcome for record in final.history] == [Outcome.LOST]
    finally:
        await app.close()


async def test_backoff_schedule_defaults_to_exponential_with_full_jitter() -> None:
    backoff = Exponential(base=1, factor=2, maximum=10)
    assert [backoff.cap(attempt) for attempt in range(1, 6)] == [1, 2, 4, 8, 10]
    assert all(0 <= backoff(attempt) <= backoff.cap(attempt) for attempt in range(1, 50))


async def test_prefetched_jobs_start_as_slots_free_and_concurrency_still_holds(app: Conveyor) -> None:
    active = 0
    peak = 0
    release = asyncio.Event()

    @app.task
    async def hold() -> None:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await release.wait()
        active -= 1

    jobs = await app.enqueue_many([hold.job() for _ in range(10)])
    async with running_worker(app, concurrency=2) as worker:
        # Two run; two more are claimed (leased) and wait for a slot without running.
        while worker.stats.claimed < 4:
            await asyncio.sleep(0.01)
        states = [(await app.get_job(job.id)).state for job in jobs]
        assert states.count(JobState.RUNNING) == 4, "two running, two prefetched (leased)"
        assert active == 2
        release.set()
        while worker.stats.acked < 10:
            await asyncio.sleep(0.01)

    assert peak == 2
    assert worker.prefetch == 2
    assert {(await app.get_job(job.id)).state for job in jobs} == {JobState.SUCCEEDED}


async def test_shutdown_hands_back_prefetched_jobs_unrun_without_burning_an_attempt(app: Conveyor) -> None:
    entered = asyncio.Event()

    @app.task
    async def linger() -> None:
        entered.set()
        await asyncio.sleep(0.1)

    jobs = await app.enqueue_many([linger.job() for _ in range(3)])
    async with running_worker(app, concurrency=1) as worker:
        await asyncio.wait_for(entered.wait(), 10)
        while worker.stats.claimed < 2:
            await asyncio.sleep(0.01)

    finals = [await app.get_job(job.id) for job in jobs]
    ran = [job for job in finals if job.state is JobState.SUCCEEDED]
    handed_back = [job for job in finals if job.state is JobState.QUEUED]
    assert len(ran) == 1, "the one started finished within the grace period"
    assert len(handed_back) == 2, "the prefetched one and the never-claimed one are queued"
    assert all(job.attempt == 0 and job.lease_owner is None for job in handed_back)
    assert sorted(record.outcome for job in handed_back for record in job.history) == [Outcome.RELEASED]


async def test_a_prefetched_job_cancelled_before_its_turn_ends_cancelled_without_running(database_url: str) -> None:
    app = Conveyor(database_url=database_url, cancel_check_seconds=0.05, poll_interval_seconds=0.05)
    release = asyncio.Event()
    ran: list[str] = []

    @app.task
    async def step(name: str) -> None:
        ran.append(name)
        await release.wait()

    try:
        first = await step.enqueue("first")
        second = await step.enqueue("second")
        async with running_worker(app, concurrency=1) as worker:
            while worker.stats.claimed < 2:
                await asyncio.sleep(0.01)
            await app.cancel_job(second.id)
            while (await app.get_job(second.id)).state is not JobState.CANCELLED:
                await asyncio.sleep(0.02)
            release.set()
            while (await app.get_job(first.id)).state is not JobState.SUCCEEDED:
                await asyncio.sleep(0.02)

        assert ran == ["first"]
        cancelled = await app.get_job(second.id)
        assert [record.outcome for record in cancelled.history] == [Outcome.CANCELLED]
    finally:
        await app.close()


async def test_a_prefetched_job_whose_lease_is_lost_is_dropped_unrun(database_url: str) -> None:
    app = Conveyor(database_url=database_url, lease_seconds=0.6, poll_interval_seconds=0.05)
    entered = asyncio.Event()
    stopped = asyncio.Event()
    ran: list[str] = []

    @app.task(max_attempts=1)
    async def step(name: str) -> None:
        ran.append(name)
        entered.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            stopped.set()
            raise

    try:
        first = await step.enqueue("first")
        second = await step.enqueue("second")
        async with running_worker(app, concurrency=1) as worker:
            await asyncio.wait_for(entered.wait(), 10)
            while worker.stats.claimed < 2:
                await asyncio.sleep(0.01)
            # Another party rescues both, as if this worker's leases had run out: the running one
            # is stopped, and the prefetched one must not start under a lease it no longer holds.
            rescued = await (await app.store()).rescue_jobs(now=app.clock() + timedelta(hours=1))
            assert {found.id for found in rescued} == {first.id, second.id}
            await asyncio.wait_for(stopped.wait(), 10)

        assert ran == ["first"]
        dropped = await app.get_job(second.id)
        assert dropped.state is JobState.DEAD
        assert [record.outcome for record in dropped.history] == [Outcome.LOST]
    finally:
        await app.close()


async def test_jobs_in_flight_counts_the_running_not_the_prefetched(app: Conveyor) -> None:
    entered = asyncio.Event()
    release = asyncio.Event()

    @app.task
    async def hold() -> None:
        entered.set()
        await release.wait()

    def in_flight() -> float:
        line = next(
            line
            for line in app.metrics.render().decode().splitlines()
            if line.startswith("conveyor_worker_jobs_in_flight ")
        )
        return float(line.split()[1])

    await app.enqueue_many([hold.job() for _ in range(3)])
    async with running_worker(app, concurrency=1) as worker:
        await asyncio.wait_for(entered.wait(), 10)
        while worker.stats.claimed < 2:
            await asyncio.sleep(0.01)
        assert in_flight() == 1, "one running; the prefetched one is not in flight"
        release.set()
        while worker.stats.acked < 3:
            await asyncio.sleep(0.01)
        assert in_flight() == 0


class _ClaimSpy:
    """Wraps the store's claim to count the claims out at once, and what ``progress`` says as each
    goes out; ``hold_from`` holds back that claim and every later one until ``release`` is set
    (``holding`` is set once one is held)."""

    def __init__(
        self, fetch_jobs: Any, *, hold_from: int | None = None, progress: Callable[[], int] = lambda: 0
    ) -> None:
        self._fetch_jobs = fetch_jobs
        self._hold_from = hold_from
        self._progress = progress
        self.calls = 0
        self.out = 0
        self.most_out = 0
        self.progress_at_call: list[int] = []
        self.holding = asyncio.Event()
        self.release = asyncio.Event()

    async def __call__(self, **claim: Any) -> Any:
        self.calls += 1
        self.progress_at_call.append(self._progress())
        self.out += 1
        self.most_out = max(self.most_out, self.out)
        try:
            if self._hold_from is not None and self.calls >= self._hold_from:
                self.holding.set()
                await self.release.wait()
            return await self._fetch_jobs(**claim)
        finally:
            self.out -= 1


async def _drained(app: Conveyor, monkeypatch: pytest.MonkeyPatch, jobs: int) -> _ClaimSpy:
    """Drain ``jobs`` jobs with a worker of concurrency 5, checking each ran once; return the spy
    on its claims, whose progress is the number of jobs started."""
    ran: list[int] = []

    @app.task
    async def note(number: int) -> None:
        ran.append(number)

    try:
        store = await app.store()
        spy = _ClaimSpy(store.fetch_jobs, progress=lambda: len(ran))
        monkeypatch.setattr(store, "fetch_jobs", spy)
        await app.enqueue_many([note.job(number) for number in range(jobs)])
        await Worker(app, concurrency=5).run(drain=True)
    finally:
        await app.close()
    assert sorted(ran) == list(range(jobs))
    return spy


async def test_while_claims_come_back_full_the_next_go_out_before_their_jobs_start(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = Conveyor(database_url=database_url, claim_batch_size=5, poll_interval_seconds=0.05)

    spy = await _drained(app, monkeypatch, 60)

    # The second claim went out as the first came back full, before any of its five jobs started.
    assert spy.progress_at_call[:2] == [0, 0]
    # Capacity is 5 slots plus 5 prefetched: a claim of 5 out while 5 run, never more.
    assert spy.most_out == 1


async def test_a_worker_under_a_queue_limit_sends_one_claim_at_a_time(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A limited claim counts the jobs its workers lease as running: it cannot run ahead of them.
    app = Conveyor(database_url=database_url, claim_batch_size=5, queue_limits={"default": 50})

    assert (await _drained(app, monkeypatch, 30)).most_out == 1


async def test_jobs_of_a_claim_still_out_at_shutdown_are_handed_back_unrun(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = Conveyor(database_url=database_url, claim_batch_size=5, shutdown_grace_seconds=1)

    @app.task
    async def quick() -> None:
        return None

    try:
        store = await app.store()
        # The first claim comes back full; the one sent after it is held until the worker stops.
        spy = _ClaimSpy(store.fetch_jobs, hold_from=2)
        monkeypatch.setattr(store, "fetch_jobs", spy)
        jobs = await app.enqueue_many([quick.job() for _ in range(30)])
        async with running_worker(app, concurrency=5) as worker:
            await asyncio.wait_for(spy.holding.wait(), 10)
            worker.stop()
            spy.release.set()
        finals = [await app.get_job(job.id) for job in jobs]
    finally:
        await app.close()

    states = collections.Counter(job.state for job in finals)
    assert JobState.RUNNING not in states, "no job is left leased to a stopped worker"
    assert states[JobState.SUCCEEDED] >= 5, "the first claim's jobs ran"
    handed_back = [job for job in finals if job.state is JobState.QUEUED and job.history]
    assert handed_back, "the held claims' jobs came back to the queue"
    assert all(job.attempt == 0 and job.lease_owner is None for job in handed_back)
    assert {record.outcome for job in handed_back for record in job.history} == {Outcome.RELEASED}


async def test_cancelling_the_run_hands_back_running_and_prefetched_jobs_and_then_ends(app: Conveyor) -> None:
    linger = lingering_task(app)
    jobs = await app.enqueue_many([linger.task.job() for _ in range(2)])
    worker = Worker(app, concurrency=1)
    run = asyncio.create_task(worker.run())
    await asyncio.wait_for(linger.entered.wait(), 10)
    while worker.stats.claimed < 2:  # the running job and the one prefetched behind it
        await asyncio.sleep(0.01)

    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(run, 10)

    finals = [await app.get_job(job.id) for job in jobs]
    assert linger.cleaned_up.is_set(), "the running task saw the cancel and ran its cleanup"
    assert [job.state for job in finals] == [JobState.QUEUED] * 2
    assert all(job.attempt == 0 and job.lease_owner is None for job in finals)
    assert [record.outcome for job in finals for record in job.history] == [Outcome.RELEASED] * 2


@pytest.mark.parametrize("backend_url", ["sqlite"], indirect=True)
async def test_a_cancelled_run_ends_within_the_grace_period_when_its_writes_cannot_land(database_url: str) -> None:
    app = Conveyor(database_url=database_url, shutdown_grace_seconds=0.2, sqlite_busy_timeout_seconds=0.1)
    linger = lingering_task(app)
    blocker = sqlite3.connect(database_url.removeprefix("sqlite:///"), isolation_level=None)
    try:
        job = await linger.task.enqueue()
        run = asyncio.create_task(Worker(app).run())
        await asyncio.wait_for(linger.entered.wait(), 10)
        blocker.execute("BEGIN EXCLUSIVE")  # every write of the worker's now fails, and is retried

        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(run, 10)

        blocker.execute("ROLLBACK")
        unwritten = await app.get_job(job.id)
        assert (unwritten.state, unwritten.history) == (JobState.RUNNING, ()), "left leased for the rescuer"
    finally:
        blocker.close()
        await app.close()
