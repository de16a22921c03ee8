"""Queues, tasks, health, readiness and the published OpenAPI contract."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from tests.api.support import Api, FakeClock, add_token, serve

from conveyor import Conveyor
from conveyor.api.app import create_app
from conveyor.api.schemas import QueuesPublic, TasksPublic
from conveyor.tokens import Scope

FIXED = datetime(2026, 1, 1, tzinfo=UTC)


async def test_queues_count_jobs_by_state_and_age_the_oldest_waiting_job(idle_api: Api) -> None:
    clock = FakeClock(FIXED)
    idle_api.conveyor.clock = clock
    await idle_api.submit("add", kwargs={"a": 1, "b": 1})
    clock.now = FIXED + timedelta(seconds=10)
    await idle_api.submit("add", kwargs={"a": 1, "b": 2})
    await idle_api.submit("shout", kwargs={"text": "later"}, delay_seconds=3600)
    archived = await idle_api.submit("add", kwargs={"a": 1, "b": 3}, queue="archive")
    assert (await idle_api.client.post(f"/jobs/{archived['id']}/cancel")).status_code == 200
    clock.now = FIXED + timedelta(seconds=60)

    response = await idle_api.client.get("/queues")

    assert response.status_code == 200
    queues = {queue.name: queue for queue in QueuesPublic.model_validate(response.json()).queues}
    assert list(queues) == ["archive", "default", "emails"], "sorted by name"
    assert queues["default"].counts == {"queued": 2}
    assert queues["default"].oldest_queued_age_seconds == pytest.approx(60), "the older of the two"
    assert queues["emails"].counts == {"scheduled": 1}
    assert queues["archive"].counts == {"cancelled": 1}
    assert queues["archive"].oldest_queued_age_seconds is None, "nothing waits in a queue of finished jobs"


async def test_tasks_lists_names_kinds_queues_and_argument_schemas(idle_api: Api) -> None:
    response = await idle_api.client.get("/tasks")

    assert response.status_code == 200
    tasks = {task.name: task for task in TasksPublic.model_validate(response.json()).tasks}
    assert list(tasks) == ["add", "blocked", "crunch", "flaky", "shout", "total"], "sorted by name"
    assert {name: task.kind for name, task in tasks.items()} == {
        "add": "async",
        "blocked": "async",
        "crunch": "cpu",
        "flaky": "async",
        "shout": "sync",
        "total": "async",
    }
    assert tasks["shout"].queue == "emails"
    assert (tasks["flaky"].max_attempts, tasks["add"].max_attempts) == (1, 5), "the app default fills in"
    assert tasks["add"].arguments_schema == {
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a", "b"],
    }
    assert tasks["shout"].arguments_schema["properties"] == {"text": {"type": "string"}}
    assert tasks["blocked"].arguments_schema == {"type": "object", "properties": {}, "required": []}


async def test_health_needs_no_credentials_even_when_tokens_exist(conveyor: Conveyor) -> None:
    await add_token(conveyor, Scope.ADMIN)
    async with serve(conveyor, run_worker=False) as served:
        health = await served.client.get("/health")
        guarded = await served.client.get("/queues")

    assert health.status_code == 200
    assert health.json() == {"status": "ok"}
    assert guarded.status_code == 401, "the server does require tokens"


async def test_a_server_stopped_right_after_it_started_shuts_down_promptly(conveyor: Conveyor) -> None:
    app = create_app(conveyor)

    async def start_and_stop() -> None:
        async with app.router.lifespan_context(app):
            pass  # no request gives the embedded worker a chance to start first

    await asyncio.wait_for(start_and_stop(), 10)
    assert app.state.worker_task.done()


async def test_ready_reports_database_schema_and_worker_checks(api: Api) -> None:
    response = await api.client.get("/ready")

    assert response.status_code == 200
    assert response.json() == {"status": "ready", "checks": {"database": "ok", "schema": "ok", "worker": "ok"}}


async def test_ready_is_503_naming_the_worker_once_the_embedded_worker_has_stopped(api: Api) -> None:
    worker_task: asyncio.Task[object] = api.app.state.worker_task
    worker_task.cancel()
    await asyncio.gather(worker_task, return_exceptions=True)

    response = await api.client.get("/ready")

    assert response.status_code == 503
    assert response.json() == {"status": "not ready", "checks": {"database": "ok", "schema": "ok", "worker": "stopped"}}


async def test_ready_without_an_embedded_worker_checks_only_the_database(idle_api: Api) -> None:
    response = await idle_api.client.get("/ready")

    assert response.status_code == 200
    assert response.json() == {"status": "ready", "checks": {"database": "ok", "schema": "ok"}}


async def test_openapi_documents_every_route_and_its_error_envelope(idle_api: Api) -> None:
    response = await idle_api.client.get("/openapi.json")

    assert response.status_code == 200
    spec = response.json()
    operations = {(path, method) for path, item in spec["paths"].items() for method in item}
    assert {
        ("/jobs", "post"),
        ("/jobs", "get"),
        ("/jobs/batch", "post"),
        ("/jobs/{job_id}", "get"),
        ("/jobs/{job_id}/cancel", "post"),
        ("/jobs/{job_id}/retry", "post"),
        ("/jobs/{job_id}/attempts", "get"),
        ("/queues", "get"),
        ("/tasks", "get"),
        ("/health", "get"),
        ("/ready", "get"),
    } <= operations
    envelope_ref = {"$ref": "#/components/schemas/ErrorEnvelope"}
    for path, method in operations:
        documented = spec["paths"][path][method]["responses"]
        for status in ("422", "500"):
            assert documented[status]["content"]["application/json"]["schema"] == envelope_ref, (path, method, status)
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


async def test_interactive_docs_are_served_and_point_at_the_spec(idle_api: Api) -> None:
    response = await idle_api.client.get("/docs")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "swagger-ui" in response.text
    assert "/openapi.json" in response.text
