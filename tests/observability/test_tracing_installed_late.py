"""A tracer provider installed while a worker runs is used from the next claim on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.support.processes import REPO_ROOT, worker_env

# Its own process: OpenTelemetry allows one global provider per process, and the test suite's
# other tracing tests install theirs for the whole run.
_SCRIPT = """
import asyncio, json, sys
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from conveyor import Conveyor
from conveyor.engine.worker import Worker

async def main():
    app = Conveyor(database_url=sys.argv[1], auto_migrate=True, poll_interval_seconds=0.05)
    done = asyncio.Queue()

    @app.task(name="mark")
    async def mark(n: int) -> None:
        await done.put(n)

    worker = Worker(app)
    running = asyncio.create_task(worker.run())
    await worker.started.wait()
    before = await mark.enqueue(1)
    await asyncio.wait_for(done.get(), 30)
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    after = await mark.enqueue(2)
    await asyncio.wait_for(done.get(), 30)
    worker.stop()
    await running
    await app.close()
    spans = exporter.get_finished_spans()
    runs = [span.attributes["messaging.message.id"] for span in spans if span.name == "run mark"]
    print(json.dumps({"before": before.id, "after": after.id, "runs": runs}))

asyncio.run(main())
"""


def test_a_provider_installed_after_the_worker_started_traces_the_jobs_claimed_after(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'late.db'}"
    finished = subprocess.run(
        [sys.executable, "-c", _SCRIPT, url],
        env=worker_env(url, log_level="WARNING"),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert finished.returncode == 0, finished.stderr
    outcome = json.loads(finished.stdout.strip().splitlines()[-1])

    assert outcome["runs"] == [outcome["after"]], "only the job claimed after the provider was installed is traced"
