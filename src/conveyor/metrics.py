"""Prometheus metrics: one registry per app, fed by engine events and the HTTP layer.

Labels are bounded: queue, task, outcome, route template, method and status; never job ids,
correlation ids or other request data.
"""

from __future__ import annotations

import bisect
import collections
import itertools
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

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


class _Buckets:
    """One histogram series: counts per bucket (not cumulative), their total and the sum."""

    __slots__ = ("counts", "sum", "total")

    def __init__(self) -> None:
        self.counts = [0] * len(BUCKETS)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        index = bisect.bisect_left(BUCKETS, value)  # the first bucket whose bound is >= value
        if index < len(BUCKETS):
            self.counts[index] += 1
        self.total += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        running = list(itertools.accumulate(self.counts))
        return [*zip(map(floatToGoString, BUCKETS), running, strict=True), ("+Inf", self.total)]


class JobTallies(Collector):
    """Attempts started and ended, and how long they waited and ran: four series per job.

    A worker records these for every job, and prometheus_client's metric objects take a lock and
    walk the buckets in Python for each observation, which costs more than a no-op job itself.
    Here an observation is a dict lookup, a bisect and a few additions under one lock; the
    collector exposes the same series (names, labels, buckets) when the registry is scraped.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._started: dict[tuple[str, str], int] = collections.defaultdict(int)
        self._waited: dict[tuple[str, str], _Buckets] = collections.defaultdict(_Buckets)
        self._ended: dict[tuple[str, str, str], int] = collections.defaultdict(int)
        self._ran: dict[tuple[str, str, str], _Buckets] = collections.defaultdict(_Buckets)

    def started(self, queue: str, task: str, waited: float | None) -> None:
        key = (queue, task)
        with self._lock:
            self._started[key] += 1
            if waited is not None:
                self._waited[key].observe(waited)

    def ended(self, queue: str, task: str, outcome: str, ran: float | None) -> None:
        key = (queue, task, outcome)
        with self._lock:
            self._ended[key] += 1
            if ran is not None:
                self._ran[key].observe(ran)

    def collect(self) -> Iterator[Metric]:
        started = CounterMetricFamily(
            "conveyor_jobs_started", "Attempts started by this process's workers.", labels=["queue", "task"]
        )
        ended = CounterMetricFamily(
            "conveyor_jobs_completed",
            "Attempts ended, by outcome: succeeded, retried, dead, lost (lease expired) or released (shutdown).",
            labels=["queue", "task", "outcome"],
        )
        ran = HistogramMetricFamily(
            "conveyor_job_duration_seconds", "How long attempts ran.", labels=["queue", "task", "outcome"]
        )
        waited = HistogramMetricFamily(
            "conveyor_job_queue_wait_seconds",
            "How long jobs waited between being due and being started.",
            labels=["queue", "task"],
        )
        with self._lock:
            for key, count in self._started.items():
                started.add_metric(list(key), count)
            for key, count in self._ended.items():
                ended.add_metric(list(key), count)
            for key, series in self._ran.items():
                ran.add_metric(list(key), series.cumulative(), series.sum)
            for key, series in self._waited.items():
                waited.add_metric(list(key), series.cumulative(), series.sum)
        yield from (started, ended, ran, waited)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.enqueued = Counter("conveyor_jobs_enqueued", "Jobs stored to run.", ["queue", "task"], registry=registry)
        # Per-attempt series: tallied as plain numbers, turned into metrics when scraped.
        self.jobs = JobTallies()
        registry.register(self.jobs)
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
        """Subscriber for the worker's events."""
        job = event.job
        if event.name is EventName.STARTED:
            wait = None if job.attempted_at is None else max((job.attempted_at - job.run_at).total_seconds(), 0.0)
            self.jobs.started(job.queue, job.task, wait)
        else:
            self.jobs.ended(job.queue, job.task, _OUTCOMES[event.name], event.duration)

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
