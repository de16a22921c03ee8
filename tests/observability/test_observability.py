"""Observability end to end: one correlation id everywhere, exact metrics, one trace."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client.parser import text_string_to_metric_families
from tests.support.private_postgres import free_port

from conveyor import CONTEXT, Conveyor, JobContext, PermanentError, constant
from conveyor.api import create_app
from conveyor.log import configure_logging


@pytest.fixture
async def echo_server() -> AsyncIterator[tuple[str, list[dict[str, str]]]]:
    """A real local HTTP server that records the headers of every request it gets."""
    seen: list[dict[str, str]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        seen.append({name.decode(): value.decode() for name, value in scope["headers"]})
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"ok"})

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="off"))
    serving = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    yield f"http://127.0.0.1:{port}", seen
    server.should_exit = True
    await serving


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    root = logging.getLogger()
    level = root.level
    conveyor = Conveyor(database_url="sqlite:///unused.db", log_format="json")
    configure_logging(conveyor.settings, stream=stream)
    yield stream
    for handler in list(root.handlers):
        if getattr(handler, "stream", None) is stream:
            root.removeHandler(handler)
    root.setLevel(level)


def _lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.startswith("{")]


@pytest.fixture
async def api_client(database_url: str) -> AsyncIterator[tuple[Conveyor, httpx.AsyncClient]]:
    conveyor = Conveyor(database_url=database_url, poll_interval_seconds=0.02)
    api = create_app(conveyor)
    async with api.router.lifespan_context(api):
        transport = httpx.ASGITransport(app=api)
        async with httpx.AsyncClient(transport=transport, base_url="http://conveyor") as client:
            yield conveyor, client


async def test_one_correlation_id_reaches_the_response_the_job_every_task_log_line_and_outgoing_calls(
    api_client: tuple[Conveyor, httpx.AsyncClient],
    echo_server: tuple[str, list[dict[str, str]]],
    json_logs: io.StringIO,
) -> None:
    conveyor, client = api_client
    url, seen = echo_server

    @conveyor.task
    async def call_out(target: str, ctx: JobContext = CONTEXT) -> int:
        ctx.logger.info("task.calling", target=target)
        response = await ctx.http.get(target)
        ctx.logger.info("task.called", status=response.status_code)
        structlog_free = logging.getLogger("thirdparty.lib")
        structlog_free.warning("a library speaks")
        return response.status_code

    submitted = await client.post(
        "/jobs", json={"task": "call_out", "args": [url]}, headers={"X-Correlation-ID": "order-7731"}
    )
    assert submitted.headers["X-Correlation-ID"] == "order-7731"
    job_id = submitted.json()["id"]
    finished = (await client.get(f"/jobs/{job_id}", params={"wait": 10})).json()

    assert finished["state"] == "succeeded"
    assert finished["correlation_id"] == "order-7731"
    assert (await conveyor.get_job(job_id)).correlation_id == "order-7731"
    assert [headers.get("x-correlation-id") for headers in seen] == ["order-7731"]
    task_lines = [line for line in _lines(json_logs) if line.get("job_id") == job_id]
    events = {line["event"] for line in task_lines}
    assert {"task.calling", "task.called", "a library speaks", "job.succeeded"} <= events
    assert all(line.get("correlation_id") == "order-7731" for line in task_lines), task_lines
    assert all(line.get("attempt") == 1 and line.get("task") == "call_out" for line in task_lines)


async def test_a_job_enqueued_by_a_job_inherits_its_correlation_id(app: Conveyor) -> None:
    from conveyor.testing import drain  # noqa: PLC0415

    @app.task
    async def child() -> None:
        return None

    @app.task
    async def parent() -> str:
        return (await child.enqueue()).id

    job = await parent.using(correlation_id="import-42").enqueue()
    await drain(app)
    child_id = (await app.get_job(job.id)).result
    assert (await app.get_job(child_id)).correlation_id == "import-42"


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


async def test_metrics_count_a_known_mix_of_successes_retries_and_dead_jobs_exactly(
    api_client: tuple[Conveyor, httpx.AsyncClient],
) -> None:
    conveyor, client = api_client
    attempts: dict[str, int] = {}

    @conveyor.task(max_attempts=3, backoff=constant(0))
    async def mixed(key: str, fail_times: int) -> str:
        attempts[key] = attempts.get(key, 0) + 1
        if attempts[key] <= fail_times:
            raise RuntimeError("not yet")
        return key

    @conveyor.task(max_attempts=2)
    async def doomed() -> None:
        raise PermanentError("never")

    plan = {"a": 0, "b": 0, "c": 0, "d": 1, "e": 5}
    ids = []
    for key, fail_times in plan.items():
        response = await client.post("/jobs", json={"task": "mixed", "args": [key, fail_times]})
        ids.append(response.json()["id"])
    ids.append((await client.post("/jobs", json={"task": "doomed"})).json()["id"])
    for job_id in ids:
        await client.get(f"/jobs/{job_id}", params={"wait": 10})
    await client.get("/no/such/route/order-7731")

    text = (await client.get("/metrics")).text
    samples = _samples(text)

    def value(name: str, **labels: str) -> float:
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    assert value("conveyor_jobs_enqueued_total", queue="default", task="mixed") == 5
    assert value("conveyor_jobs_enqueued_total", queue="default", task="doomed") == 1
    # a, b, c: one attempt each; d: a retry then success; e: three failed attempts, then dead.
    assert value("conveyor_jobs_started_total", queue="default", task="mixed") == 3 + 2 + 3
    assert value("conveyor_jobs_completed_total", queue="default", task="mixed", outcome="succeeded") == 4
    assert value("conveyor_jobs_completed_total", queue="default", task="mixed", outcome="retried") == 1 + 2
    assert value("conveyor_jobs_completed_total", queue="default", task="mixed", outcome="dead") == 1
    assert value("conveyor_jobs_completed_total", queue="default", task="doomed", outcome="dead") == 1
    assert value("conveyor_job_duration_seconds_count", queue="default", task="mixed", outcome="succeeded") == 4
    assert value("conveyor_queue_jobs", queue="default", state="succeeded") == 4
    assert value("conveyor_queue_jobs", queue="default", state="dead") == 2
    assert value("conveyor_http_requests_total", method="POST", route="/jobs", status="202") == 6
    assert value("conveyor_http_requests_total", method="GET", route="/jobs/{job_id}", status="200") == 6
    assert value("conveyor_http_requests_total", method="GET", route="unmatched", status="404") == 1
    assert value("conveyor_worker_capacity") == conveyor.settings.concurrency
    for job_id in ids:
        assert job_id not in text, "no label value comes from a job id"
    assert "order-7731" not in text, "no label value comes from a request path"


async def test_one_trace_joins_the_request_the_enqueue_and_every_attempt(
    api_client: tuple[Conveyor, httpx.AsyncClient], spans: InMemorySpanExporter
) -> None:
    conveyor, client = api_client
    calls = 0

    @conveyor.task(max_attempts=3, backoff=constant(0))
    async def twice() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("first attempt fails")

    job_id = (await client.post("/jobs", json={"task": "twice"})).json()["id"]
    assert (await client.get(f"/jobs/{job_id}", params={"wait": 10})).json()["state"] == "succeeded"

    finished = spans.get_finished_spans()
    request = next(span for span in finished if span.name == "POST /jobs")
    enqueue = next(span for span in finished if span.name == "enqueue")
    attempts = [span for span in finished if span.name == "run twice"]
    assert request.kind is SpanKind.SERVER
    assert len(attempts) == 2
    assert request.context is not None
    assert enqueue.context is not None
    trace_id = request.context.trace_id
    assert enqueue.context.trace_id == trace_id
    assert enqueue.parent is not None
    assert enqueue.parent.span_id == request.context.span_id
    for attempt in attempts:
        assert attempt.context is not None
        assert attempt.context.trace_id == trace_id, "attempts continue the request's trace"
        assert [link.context.span_id for link in attempt.links] == [enqueue.context.span_id]
    assert sorted(int(str(span.attributes["conveyor.attempt"])) for span in attempts if span.attributes) == [1, 2]
    assert not attempts[0].status.is_ok or not attempts[1].status.is_ok, "the failed attempt is marked"
