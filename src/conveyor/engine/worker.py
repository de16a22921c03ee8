"""A worker process's engine: the claim loop plus the small loops that keep it honest.

- producer: claims up to free capacity (slots plus a prefetch buffer), starts each job as an
  asyncio task; a prefetched job starts the moment a slot frees, with no claim round trip between.
  While claims come back full, a second claim is out while the first one's jobs start
- acker: writes outcomes in batches, retrying a failed write (acks are idempotent)
- heartbeat: renews the leases of running jobs
- rescuer: ends attempts whose lease expired, on any worker's behalf
- pruner: deletes finished jobs past retention
- scheduler: enqueues the due ticks of periodic schedules (``conveyor.engine.scheduler``)

Shutdown (SIGTERM/SIGINT, or ``stop()``): stop claiming, let running jobs finish within the
grace period, then cancel the rest and hand them back without burning an attempt. A second
signal skips the grace period; so does cancelling ``run()`` itself, which then raises again.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import socket
import threading
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import structlog

from conveyor import outgoing
from conveyor.context import CancelFlag
from conveyor.engine.cpu import CpuPool
from conveyor.engine.executor import Executor
from conveyor.engine.scheduler import Scheduler
from conveyor.errors import ConveyorError
from conveyor.events import EventName, Events, JobEvent, log_event
from conveyor.jobs import Ack, Job, JobState, new_job_id
from conveyor.limits import ClaimLimits
from conveyor.log import configure_logging

if TYPE_CHECKING:
    from conveyor.app import Conveyor
    from conveyor.engine.processes import ListeningTurn
    from conveyor.storage import Store

logger = structlog.get_logger("conveyor.worker")

_ACK_COALESCE_SECONDS = 0.002
_CLAIM_COALESCE_SECONDS = 0.002
_CLAIMS_IN_FLIGHT = 2
# Acks that leave their job to run again: a retry, or a hand-back.
_REQUEUED = frozenset({JobState.RETRYING, JobState.QUEUED})


@dataclass(slots=True)
class _Running:
    job: Job
    started_at: datetime
    task: asyncio.Task[None] | None = None
    lease_lost: bool = False
    cancel_requested: bool = False
    cancel_event: CancelFlag = field(default_factory=CancelFlag)
    progress: dict[str, Any] | None = None
    progress_written: dict[str, Any] | None = None

    def report(self, fraction: float, message: str | None) -> None:
        """Called from the task (its thread, or the loop): only keeps the latest report."""
        self.progress = {"fraction": fraction, "message": message, "at": datetime.now(UTC).isoformat()}


@dataclass(slots=True)
class WorkerStats:
    """Counts since start; what a drain in tests or a status line reads."""

    claimed: int = 0
    acked: int = 0
    by_outcome: dict[str, int] = field(default_factory=dict)


class Worker:
    """Runs jobs from the app's database until stopped.

    ``await Worker(app).run()`` runs until ``stop()`` or a signal (with ``handle_signals``);
    ``await Worker(app).run(drain=True)`` returns once no job is due and none is running.
    """

    def __init__(
        self,
        app: Conveyor,
        *,
        queues: Sequence[str] | None = None,
        concurrency: int | None = None,
        events: Events | None = None,
        schedules: bool | None = None,
        listening_turn: ListeningTurn | None = None,
    ) -> None:
        """``listening_turn``: shared with sibling worker processes, one of which listens for new jobs at a time."""
        self.app = app
        self.settings = app.settings
        self.queues = tuple(queues or self.settings.queues)
        self.concurrency = concurrency or self.settings.concurrency
        self.runs_schedules = self.settings.schedules_enabled if schedules is None else schedules
        self.id = f"{socket.gethostname()}:{os.getpid()}:{new_job_id()[-12:]}"
        self.events = events or Events()
        self.events.subscribe(log_event)
        self.metrics = app.metrics if self.settings.metrics_enabled else None
        if self.metrics is not None:
            self.events.subscribe(self.metrics.on_event)
        self.stats = WorkerStats()
        self._clock: Callable[[], datetime] = app.clock
        # Every job this worker holds a lease on: started ones, and prefetched ones waiting for a slot.
        self._running: dict[str, _Running] = {}
        self._prefetched: collections.deque[_Running] = collections.deque()
        self._active = 0
        self.prefetch = (
            min(self.concurrency, self.settings.claim_batch_size)
            if self.settings.prefetch is None
            else self.settings.prefetch
        )
        self._executor: Executor | None = None
        self._store: Store | None = None
        self._acks: list[Ack] = []
        self._claims = 0
        # Made here, not in run(): a stop() that comes before run() starts must still count.
        self._stopping = asyncio.Event()
        self._immediate = asyncio.Event()
        self._signalled = False
        self._changed: asyncio.Event | None = None
        # Set when jobs may have become due that no notification announces (see `_wait_for_work`).
        self._news: asyncio.Event | None = None
        self._draining = False
        self._limits: ClaimLimits | None = None
        self._ack_ready: asyncio.Event | None = None
        self._acks_in_flight = 0
        self._ack_rounds = 0
        self._claims_settled = False
        self._turn = listening_turn
        self.started = asyncio.Event()

    # -- control ------------------------------------------------------------------------

    def stop(self, *, immediate: bool = False) -> None:
        """Stop claiming and shut down; ``immediate`` hands running jobs back without waiting.

        Safe to call before ``run()``: the run then ends as soon as it starts.
        """
        if self._stopping.is_set() or immediate:
            self._immediate.set()
        self._stopping.set()
        self._wake(news=True)

    @property
    def stopping(self) -> bool:
        """Whether a stop was asked for; the run may still be finishing its jobs."""
        return self._stopping.is_set()

    def _wake(self, *, news: bool = False) -> None:
        if self._changed is not None:
            self._changed.set()
        if news and self._news is not None:
            self._news.set()
            if self._store is not None:
                self._store.wake_waiters()

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        # Only a second signal skips the grace period. A stop asked for otherwise (a supervisor's,
        # which may come just before the same signal reaches this process directly) does not count.
        immediate = self._signalled
        self._signalled = True
        logger.info("worker.signal", signal=name, immediate=immediate, running=len(self._running))
        if immediate or not self._stopping.is_set():
            self.stop(immediate=immediate)

    # -- the run ------------------------------------------------------------------------

    async def run(self, *, drain: bool = False, handle_signals: bool = False) -> WorkerStats:
        self._changed, self._news, self._ack_ready = asyncio.Event(), asyncio.Event(), asyncio.Event()
        self._draining = drain
        self._event_loop = asyncio.get_running_loop()
        if not structlog.is_configured():
            # An embedded worker whose application set up no logging still logs through stdlib
            # logging at the configured level, not structlog's print-everything default.
            configure_logging(self.settings)
        store = self._store = await self.app.store()
        loop = self._event_loop
        if handle_signals:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, self._on_signal, signum)
        cpu_pool = CpuPool(self.settings.cpu_workers, log_level=self.settings.log_level)
        http = outgoing.SharedClient()
        executor = self._executor = Executor(
            self.app.get_task,
            worker_id=self.id,
            cpu_pool=cpu_pool,
            events=self.events,
            clock=self._clock,
            http=http,
        )
        if self.metrics is not None:
            self.metrics.capacity.inc(self.concurrency)
            self.metrics.count_running(self, lambda: self._active)
        rates = {name: task.options.rate_limit for name, task in self.app.tasks.items() if task.options.rate_limit}
        self._limits = ClaimLimits(queues=self.settings.queue_limits, rates=rates).for_queues(self.queues)
        if self._limits is not None:
            # A limit counts leased jobs as running and a rate counts claims as starts: a prefetched
            # job would hold a place it does not use yet.
            self.prefetch = 0
        logger.info(
            "worker.started",
            worker=self.id,
            queues=list(self.queues),
            concurrency=self.concurrency,
            prefetch=self.prefetch,
            tasks=sorted(self.app.tasks),
            **(self._limits or ClaimLimits()).describe(),
        )
        self.started.set()
        loops = {
            "heartbeat": (self.settings.heartbeat_interval, self._heartbeat),
            "rescuer": (self.settings.rescue_interval, self._rescue),
            "canceller": (self.settings.cancel_check_seconds, self._check_cancels),
            "progress": (self.settings.progress_write_seconds, self._write_progress),
        }
        background = [
            asyncio.create_task(self._loop(name, interval, step, store)) for name, (interval, step) in loops.items()
        ]
        if self.settings.retention_seconds > 0:
            background.append(
                asyncio.create_task(self._loop("pruner", self.settings.prune_interval_seconds, self._prune, store))
            )
        # The schedules on this worker's queues; a drain runs what is there and must not make more.
        schedules = [schedule for schedule in self.app.schedules.values() if schedule.queue in self.queues]
        if self.runs_schedules and schedules and not drain:
            background.append(asyncio.create_task(Scheduler(self.app, schedules).run()))
        acker = asyncio.create_task(self._acker(store))
        cancelled = False
        try:
            await self._produce(store, executor, drain=drain)
            await self._finish_running()
        except asyncio.CancelledError:
            # Cancelled from outside (an embedding application shutting down): stop at once, as
            # on a second signal. Running jobs are cancelled and prefetched ones dropped, each
            # handed back, so the acker below has nothing left to wait for but their writes.
            cancelled = True
            self.stop(immediate=True)
            await self._finish_running()
            raise
        finally:
            self._stopping.set()
            self._claims_settled = True
            self._ack_ready.set()
            if cancelled:
                # The caller wants the run over: the writes get the grace period to land (the
                # acker retries a failing one for as long as it takes). A job whose outcome did
                # not land stays leased until the rescuer takes it back, as after a crash.
                await asyncio.wait({acker}, timeout=self.settings.shutdown_grace_seconds)
                acker.cancel()
                await asyncio.gather(acker, return_exceptions=True)
            else:
                await acker
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            cpu_pool.close()
            await http.aclose()
            if self._turn is not None:
                self._turn.give_up()
            if self.metrics is not None:
                self.metrics.capacity.dec(self.concurrency)
                self.metrics.forget_running(self)
            if handle_signals:
                for signum in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(signum)
            logger.info("worker.stopped", worker=self.id, claimed=self.stats.claimed, acked=self.stats.acked)
        return self.stats

    async def _produce(self, store: Store, executor: Executor, *, drain: bool) -> None:
        assert self._changed is not None
        capacity = self.concurrency + self.prefetch
        batch_size = self.settings.claim_batch_size
        # Claims sent and not yet back, oldest first, with the jobs each may bring (counted as
        # taken). While claims come back full, the next ones go out before the jobs of this one
        # start: the worker's Python and the database's work on claims then overlap instead of
        # taking turns, which is what bounds one worker's throughput on short jobs.
        claims: collections.deque[tuple[asyncio.Task[list[Job]], int]] = collections.deque()
        flowing = False
        try:
            while not self._stopping.is_set():
                if not claims:
                    free = capacity - len(self._running)
                    if free <= 0:
                        await self._wait_for_change(None)
                        continue
                    if self._running and free < min(capacity // 2, batch_size):
                        # Slots free up one by one; claiming each alone costs a transaction apiece.
                        # Wait a moment for more, unless the claim would fill half the capacity.
                        await asyncio.sleep(_CLAIM_COALESCE_SECONDS)
                        free = capacity - len(self._running)
                    claims.append(self._send_claim(store, min(free, batch_size)))
                # A limited claim counts leased jobs as running: it never runs ahead of its jobs.
                while flowing and self._limits is None and len(claims) < _CLAIMS_IN_FLIGHT:
                    room = capacity - len(self._running) - sum(limit for _, limit in claims)
                    if room < min(capacity // 2, batch_size):
                        break
                    claims.append(self._send_claim(store, min(room, batch_size)))
                claim, limit = claims.popleft()
                acks_before = self._ack_rounds
                try:
                    jobs = await claim
                except ConveyorError as exc:
                    flowing = False
                    logger.warning("worker.claim_failed", error=str(exc))
                    await self._wait_for_change(self.settings.poll_interval)
                    continue
                flowing = len(jobs) == limit
                if flowing and not claims and self._limits is None:
                    # More are due: the next claim goes out before these jobs start, and the
                    # database works on it while they run (sent after them, it waited for a
                    # whole batch of first steps: 14 ms for 1,000 no-op jobs here).
                    room = capacity - len(self._running) - len(jobs)
                    if room >= min(capacity // 2, batch_size):
                        claims.append(self._send_claim(store, min(room, batch_size)))
                if jobs:
                    executor.notice_tracing()
                for job in jobs:
                    self._start(job, executor)
                self.stats.claimed += len(jobs)
                if jobs and self._turn is not None:
                    self._hand_on_turn(self._turn, store, more_due=flowing)
                if jobs:
                    if flowing or claims:
                        continue
                    # Let the jobs just started take their first step before the next claim's own
                    # Python runs: an idle worker's one job starts a claim's worth sooner.
                    await asyncio.sleep(0)
                    # A short claim took every due job: the next waits for news of more, where
                    # asking again at once would find none, a statement for nothing per wake-up.
                if claims:
                    continue
                # An ack that landed while the claim ran may have queued more (a workflow's next step).
                settled = self._ack_rounds == acks_before
                if drain and settled and not self._running and not self._acks and not self._acks_in_flight:
                    return
                await self._wait_for_work(store)
        except BaseException:
            # A run cancelled or failing: the claims still out go with it; their leases lapse and
            # the rescuer takes the jobs back, as after a crash.
            for claim, _ in claims:
                claim.cancel()
            raise
        # Stopped: the claims still out come back and their jobs are handed back at once.
        for claim, _ in claims:
            await self._hold_unstarted(claim)

    def _hand_on_turn(self, turn: ListeningTurn, store: Store, *, more_due: bool) -> None:
        """Let a sibling process listen once this one has plenty to run, and wake one if more jobs are due."""
        if turn.held:
            if more_due or len(self._running) >= max(1, self.concurrency // 2):
                store.stop_listening()
                turn.give_up()
        elif more_due:
            turn.poke()

    def _send_claim(self, store: Store, limit: int) -> tuple[asyncio.Task[list[Job]], int]:
        claim = self._event_loop.create_task(
            store.fetch_jobs(
                queues=self.queues,
                limit=limit,
                lease_owner=self._next_lease_owner(),
                lease_seconds=self.settings.lease_seconds,
                now=self._clock(),
                limits=self._limits,
            )
        )
        return claim, limit

    async def _hold_unstarted(self, claim: asyncio.Task[list[Job]]) -> None:
        """Keep the jobs of a claim still out at a stop as prefetched ones, which the shutdown
        then hands back unrun."""
        try:
            jobs = await claim
        except ConveyorError:
            return
        self.stats.claimed += len(jobs)
        for job in jobs:
            running = _Running(job=job, started_at=self._clock())
            self._running[job.id] = running
            self._prefetched.append(running)

    def _next_lease_owner(self) -> str:
        # A fresh token per claim fences acks: a lease taken again later never matches an old one.
        self._claims += 1
        return f"{self.id}#{self._claims}"

    def _start(self, job: Job, executor: Executor) -> None:
        running = _Running(job=job, started_at=self._clock())
        self._running[job.id] = running
        if self._active < self.concurrency:
            self._launch(running, executor)
        else:
            self._prefetched.append(running)

    def _launch(self, running: _Running, executor: Executor) -> None:
        self._active += 1
        # Named by the job id, a string that exists already: unnamed, Python 3.11 formats a fresh
        # "Task-N" for every task. Made by the loop itself: asyncio.create_task looks the running
        # loop up first, a getpid() system call per job.
        running.task = self._event_loop.create_task(self._attempt(running, executor), name=running.job.id)

    def _launch_prefetched(self, executor: Executor) -> None:
        """Start prefetched jobs in the slots free now; none once the worker is stopping."""
        while self._prefetched and self._active < self.concurrency and not self._stopping.is_set():
            running = self._prefetched.popleft()
            if self._running.get(running.job.id) is running:  # not dropped (cancelled, lease lost)
                running.started_at = self._clock()
                self._launch(running, executor)

    def _drop_prefetched(self, running: _Running, ack: Ack | None) -> None:
        """Let go of a prefetched job that never started, acking it if it still is ours to ack."""
        self._running.pop(running.job.id, None)
        if ack is not None:
            self._acks.append(ack)
        assert self._ack_ready is not None
        self._ack_ready.set()
        self._wake()

    async def _attempt(self, running: _Running, executor: Executor) -> None:
        assert self._ack_ready is not None
        try:
            # Await first, then append: `self._acks` is swapped out by the acker meanwhile.
            ack = await executor.execute(running.job, running.cancel_event, running.report)
            if running.cancel_requested:
                # The task noticed the cancel and returned: the job still ends cancelled.
                ack = executor.cancelled(running.job, running.started_at)
            self._acks.append(ack)
        except asyncio.CancelledError:
            if running.cancel_requested:
                self._acks.append(executor.cancelled(running.job, running.started_at))
            elif not running.lease_lost:
                self._acks.append(executor.released(running.job, running.started_at))
            raise
        finally:
            self._running.pop(running.job.id, None)
            self._active -= 1
            self._launch_prefetched(executor)
            self._ack_ready.set()
            # A free slot is news only under a limit, which may have held due jobs back for it.
            self._wake(news=self._limits is not None)

    async def _wait_for_change(self, timeout: float | None) -> None:
        assert self._changed is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)
        self._changed.clear()

    async def _wait_for_work(self, store: Store) -> None:
        """Sleep until jobs may be due, or the poll interval has passed.

        Jobs become due by an enqueue anywhere (which the store hears of) or by what this worker
        writes: an ack that queues a retry, hands a job back or moves a workflow on. A job that
        merely finished is news only under a limit, or to a drain that may now be over.
        """
        assert self._changed is not None
        assert self._news is not None
        # News of this worker's own ends the store's wait too (`_wake`): one wait, where waiting
        # on both in tasks of their own cost about 70 µs a wake-up more, on every idle job.
        if not self._news.is_set():
            turn = self._turn
            if turn is not None and not turn.held:
                # Wake-ups sent before now announced jobs the claim just made has seen. Dropped
                # before the turn is tried: one sent after the try is a worker giving the turn up.
                turn.forget_pokes()
            if turn is None or turn.take():
                await store.wait_for_jobs(self.settings.poll_interval)
            else:
                await turn.wait_for_poke(self.settings.poll_interval, self._news)
        self._news.clear()
        self._changed.clear()

    async def _finish_running(self) -> None:
        """Hand back prefetched jobs; give running ones the grace period, then cancel them.

        Cancelled attempts hand themselves back (see ``_attempt``).
        """
        assert self._executor is not None
        while self._prefetched:
            running = self._prefetched.popleft()
            if self._running.get(running.job.id) is running:
                self._drop_prefetched(running, self._executor.released(running.job, self._clock()))
        pending = {running.task for running in self._running.values() if running.task is not None}
        if not pending:
            return
        grace = 0.0 if self._immediate.is_set() else self.settings.shutdown_grace_seconds
        logger.info("worker.draining", running=len(pending), grace_seconds=grace)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        second_signal = asyncio.ensure_future(self._immediate.wait())
        try:
            while pending and not self._immediate.is_set() and (remaining := deadline - loop.time()) > 0:
                _, pending = await asyncio.wait(
                    {*pending, second_signal}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
                pending.discard(second_signal)
        finally:
            second_signal.cancel()
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def _acker(self, store: Store) -> None:
        """Write acks in batches until the worker has stopped and nothing is left to write."""
        assert self._ack_ready is not None
        while True:
            if not self._acks:
                # Not as soon as a stop is asked for: a claim still out then brings jobs whose
                # outcomes (or hand-backs) must be written too, or they would stay leased.
                if self._claims_settled and not self._running:
                    return
                await self._ack_ready.wait()
                self._ack_ready.clear()
                continue
            if self._running and len(self._acks) < self.concurrency // 2:
                # Group commit: jobs claimed together tend to finish together; one transaction
                # for all of them beats one per job. A few milliseconds buy a batch.
                await asyncio.sleep(_ACK_COALESCE_SECONDS)
            batch, self._acks = self._acks, []
            self._acks_in_flight = len(batch)
            try:
                applied = await store.ack_jobs(batch, now=self._clock())
            except ConveyorError as exc:
                # The write is fenced, so trying it again can only land it once.
                logger.warning("worker.ack_failed", error=str(exc), acks=len(batch))
                self._acks[:0] = batch
                await asyncio.sleep(1.0)
                continue
            finally:
                self._acks_in_flight = 0
            self._ack_rounds += 1
            self.stats.acked += len(applied)
            news = self._draining or self._limits is not None
            for ack in batch:
                self.stats.by_outcome[ack.state.value] = self.stats.by_outcome.get(ack.state.value, 0) + 1
                if ack.job_id not in applied:
                    logger.warning("worker.ack_fenced", job_id=ack.job_id, state=ack.state.value)
                news = news or ack.state in _REQUEUED or ack.workflow_id is not None
            self._wake(news=news)

    async def _loop(
        self, name: str, interval: float, step: Callable[[Store], Coroutine[Any, Any, None]], store: Store
    ) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await step(store)
            except ConveyorError as exc:
                logger.warning(f"worker.{name}_failed", error=str(exc))

    async def _heartbeat(self, store: Store) -> None:
        leases = {job_id: running.job.lease_owner or "" for job_id, running in self._running.items()}
        if not leases:
            return
        held = await store.heartbeat_jobs(leases, lease_seconds=self.settings.lease_seconds, now=self._clock())
        for job_id in set(leases) - held:
            running = self._running.get(job_id)
            if running is not None and running.task is None:
                # Prefetched, not started: the job is someone else's now; forget it, unrun.
                logger.warning("worker.lease_lost", job_id=job_id, task=running.job.task, started=False)
                self._drop_prefetched(running, None)
                continue
            if running is None or running.task is None or running.task.done():
                continue
            # Rescued or cancelled elsewhere: our result would be fenced out, so stop the work.
            logger.warning("worker.lease_lost", job_id=job_id, task=running.job.task)
            running.lease_lost = True
            running.task.cancel()

    async def _write_progress(self, store: Store) -> None:
        """Write the latest progress of running jobs that reported since the last write: one batch."""
        reports = {}
        for job_id, running in list(self._running.items()):
            latest = running.progress
            if latest is not None and latest is not running.progress_written:
                reports[job_id] = (running.job.lease_owner or "", latest)
                running.progress_written = latest
        await store.record_progress(reports, now=self._clock())

    async def _check_cancels(self, store: Store) -> None:
        """Stop running jobs a user cancelled: async ones at once, others after a grace period."""
        asking = [job_id for job_id, running in self._running.items() if not running.cancel_requested]
        if not asking:
            return
        for job_id in await store.cancel_requested_among(asking):
            running = self._running.get(job_id)
            if running is not None and running.task is None and self._executor is not None:
                # Prefetched, not started: it ends cancelled without running at all.
                running.cancel_requested = True
                self._drop_prefetched(running, self._executor.cancelled(running.job, self._clock()))
                continue
            if running is None or running.task is None or running.task.done():
                continue
            running.cancel_requested = True
            running.cancel_event.set()
            task = self.app.tasks.get(running.job.task)
            at_once = task is not None and task.is_async and not task.options.cpu
            logger.info(
                "worker.cancelling",
                job_id=job_id,
                task=running.job.task,
                grace_seconds=0 if at_once else self.settings.cancel_grace_seconds,
            )
            if at_once:
                running.task.cancel()
            else:
                # A thread cannot be interrupted: it is told through ctx.cancel_requested and
                # abandoned if still running after the grace; a CPU task's process is killed then.
                asyncio.get_running_loop().call_later(self.settings.cancel_grace_seconds, running.task.cancel)

    async def _rescue(self, store: Store) -> None:
        for job in await store.rescue_jobs(now=self._clock()):
            self.events.emit(JobEvent(EventName.LOST, job, self.id))
            if job.attempt >= job.max_attempts:
                self.events.emit(JobEvent(EventName.DEAD, job, self.id))

    async def _prune(self, store: Store) -> None:
        cutoff = self._clock() - timedelta(seconds=self.settings.retention_seconds)
        deleted = await store.prune_jobs(finished_before=cutoff)
        if deleted:
            logger.info("worker.pruned", deleted=deleted)


def threads_still_running() -> int:
    """Task threads still busy (a sync task past its timeout, or one handed back at shutdown)."""
    return sum(1 for thread in threading.enumerate() if thread.name.startswith("conveyor-task") and thread.is_alive())


__all__ = ["Worker", "WorkerStats", "threads_still_running"]
