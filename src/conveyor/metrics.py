"""Prometheus metrics: one registry per app, fed by engine events and the HTTP layer.

Labels are bounded: queue, task, outcome, route template, method and status; never job ids,
correlation ids or other request data.
"""

from __future__ import annotations

import functools
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from conveyor.events import EventName, JobEvent

if TYPE_CHECKING:
    from datetime import datetime

    from conveyor.storage import Store

CONTENT_TYPE = CONTENT_TYPE_LATEST

# From a millisecond no-op to an hour-long report, on one scale.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

_OUTCOMES = {
    EventName.SUCCEEDED: "succeeded",
    EventName.RETRYING: "retried",
    EventName.DEAD: "dead",
    EventName.LOST: "lost",
    EventName.RELEASED: "released",
    EventName.CANCELLED: "cancelled",
}


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.enqueued = Counter("conveyor_jobs_enqueued", "Jobs stored to run.", ["queue", "task"], registry=registry)
        self.started = Counter(
            "conveyor_jobs_started", "Attempts started by this process's workers.", ["queue", "task"], registry=registry
        )
        self.completed = Counter(
            "conveyor_jobs_completed",
            "Attempts ended, by outcome: succeeded, retried, dead, lost (lease expired) or released (shutdown).",
            ["queue", "task", "outcome"],
            registry=registry,
        )
        self.duration = Histogram(
            "conveyor_job_duration_seconds",
            "How long attempts ran.",
            ["queue", "task", "outcome"],
            buckets=BUCKETS,
            registry=registry,
        )
        self.queue_wait = Histogram(
            "conveyor_job_queue_wait_seconds",
            "How long jobs waited between being due and being started.",
            ["queue", "task"],
            buckets=BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "conveyor_worker_jobs_in_flight", "Jobs running in this process's workers now.", registry=registry
        )
        # Read at scrape time from the running workers, not counted up and down once per job.
        self._workers_running: weakref.WeakKeyDictionary[object, Callable[[], int]] = weakref.WeakKeyDictionary()
        self.in_flight.set_function(lambda: sum(count() for count in list(self._workers_running.values())))
        self.capacity = Gauge(
            "conveyor_worker_capacity", "Jobs this process's workers may run at once.", registry=registry
        )
        self.queue_jobs = Gauge(
            "conveyor_queue_jobs", "Jobs in the database, by queue and state.", ["queue", "state"], registry=registry
        )
        self.oldest_due_age = Gauge(
            "conveyor_queue_oldest_due_age_seconds",
            "How long the oldest due job of each queue has waited.",
            ["queue"],
            registry=registry,
        )
        self.http_requests = Counter(
            "conveyor_http_requests",
            "HTTP requests answered, by route template and status.",
            ["method", "route", "status"],
            registry=registry,
        )
        self.http_duration = Histogram(
            "conveyor_http_request_duration_seconds",
            "HTTP request latency by route template.",
            ["method", "route"],
            buckets=BUCKETS,
            registry=registry,
        )
        self._queues_refreshed_at = float("-inf")

    def count_running(self, worker: object, running: Callable[[], int]) -> None:
        """Count ``running()`` jobs in flight while ``worker`` lives (or until ``forget_running``)."""
        self._workers_running[worker] = running

    def forget_running(self, worker: object) -> None:
        self._workers_running.pop(worker, None)

    def on_event(self, event: JobEvent) -> None:
        """Subscriber for the worker's events: two cached children per event, no label lookups."""
        job = event.job
        if event.name is EventName.STARTED:
            started, queue_wait = self._started_children(job.queue, job.task)
            started.inc()
            if job.attempted_at is not None:
                queue_wait.observe(max((job.attempted_at - job.run_at).total_seconds(), 0.0))
            return
        completed, duration = self._completed_children(job.queue, job.task, _OUTCOMES[event.name])
        completed.inc()
        if event.duration is not None:
            duration.observe(event.duration)

    @functools.lru_cache(maxsize=4_096)  # noqa: B019 - one Metrics per app, living as long as it
    def _started_children(self, queue: str, task: str) -> tuple[Any, Any]:
        return self.started.labels(queue, task), self.queue_wait.labels(queue, task)

    @functools.lru_cache(maxsize=4_096)  # noqa: B019 - one Metrics per app, living as long as it
    def _completed_children(self, queue: str, task: str, outcome: str) -> tuple[Any, Any]:
        return self.completed.labels(queue, task, outcome), self.duration.labels(queue, task, outcome)

    async def refresh_queues(self, store: Store, now: datetime, *, max_age: float = 5.0) -> None:
        """Queue depth from the database, at most every ``max_age`` seconds (scrapes stay cheap)."""
        if time.monotonic() - self._queues_refreshed_at < max_age:
            return
        self._queues_refreshed_at = time.monotonic()
        stats = await store.queue_stats()
        self.queue_jobs.clear()
        self.oldest_due_age.clear()
        for queue in stats:
            for state, count in queue.counts.items():
                self.queue_jobs.labels(queue.queue, state.value).set(count)
            if queue.oldest_runnable_at is not None and queue.oldest_runnable_at <= now:
                age = (now - queue.oldest_runnable_at).total_seconds()
                self.oldest_due_age.labels(queue.queue).set(age)

    def render(self) -> bytes:
        return generate_latest(self.registry)
