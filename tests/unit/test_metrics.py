"""The per-job tallies expose exactly what prometheus_client's own metrics would for the same observations."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from conveyor.metrics import BUCKETS, Metrics


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if not sample.name.endswith("_created")
    }


def test_tallies_match_prometheus_client_for_the_same_observations() -> None:
    rng = random.Random(7)
    metrics = Metrics()
    reference = CollectorRegistry()
    started = Counter("conveyor_jobs_started", "", ["queue", "task"], registry=reference)
    ended = Counter("conveyor_jobs_completed", "", ["queue", "task", "outcome"], registry=reference)
    ran = Histogram(
        "conveyor_job_duration_seconds", "", ["queue", "task", "outcome"], buckets=BUCKETS, registry=reference
    )
    waited = Histogram("conveyor_job_queue_wait_seconds", "", ["queue", "task"], buckets=BUCKETS, registry=reference)
    # Values on bucket bounds too: a bound belongs to its own bucket (le is "less or equal").
    values = [*BUCKETS, 0.0, 5000.0, *(rng.expovariate(1 / rng.choice(BUCKETS)) for _ in range(2_000))]
    for value in values:
        queue, task, outcome = rng.choice(["a", "b"]), rng.choice(["x", "y"]), rng.choice(["succeeded", "dead"])
        metrics.jobs.started(queue, task, value)
        started.labels(queue, task).inc()
        waited.labels(queue, task).observe(value)
        metrics.jobs.ended(queue, task, outcome, value / 2)
        ended.labels(queue, task, outcome).inc()
        ran.labels(queue, task, outcome).observe(value / 2)
    metrics.jobs.ended("a", "x", "lost", None)  # no duration: counted, not timed
    ended.labels("a", "x", "lost").inc()

    theirs = _samples(generate_latest(reference).decode())
    names = {name for name, _ in theirs}
    ours = {key: value for key, value in _samples(metrics.render().decode()).items() if key[0] in names}

    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        assert abs(ours[key] - value) <= 1e-9 * max(1.0, abs(value)), key
