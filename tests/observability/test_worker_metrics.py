"""A standalone worker serves its own metrics."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tests.support import tasks as support
from tests.support.private_postgres import free_port
from tests.support.processes import WorkerProcess

from conveyor import Conveyor

pytestmark = pytest.mark.integration


async def test_a_worker_with_a_metrics_port_serves_its_counters(tmp_path: Path, app: Conveyor) -> None:
    port = free_port()
    worker = WorkerProcess(tmp_path / "worker.log", app.settings.database_url, ["--metrics-port", str(port)])
    try:
        worker.wait_started()
        noop = app.task(name="noop")(support.noop.fn)
        jobs = [await noop.enqueue(n) for n in range(3)]
        for job in jobs:
            await app.wait_for_job(job.id, timeout=30)
        async with httpx.AsyncClient(timeout=10) as client:
            response = await client.get(f"http://127.0.0.1:{port}/metrics")
            missing = await client.get(f"http://127.0.0.1:{port}/elsewhere")
    finally:
        exit_code = worker.stop()
    assert exit_code == 0
    assert response.status_code == 200
    assert missing.status_code == 404
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }
    succeeded = (("outcome", "succeeded"), ("queue", "default"), ("task", "noop"))
    assert samples[("conveyor_jobs_completed_total", succeeded)] == 3
    assert samples[("conveyor_queue_jobs", (("queue", "default"), ("state", "succeeded")))] == 3
