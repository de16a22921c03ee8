"""Health, readiness, queues and tasks."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from conveyor.api.deps import Authenticated, CanRead, ConveyorDep
from conveyor.api.errors import ERROR_RESPONSES, ApiError
from conveyor.api.schemas import Health, QueuePublic, QueuesPublic, Ready, TaskPublic, TasksPublic
from conveyor.errors import ConveyorError
from conveyor.metrics import CONTENT_TYPE
from conveyor.storage import migrate

router = APIRouter(responses=ERROR_RESPONSES)


@router.get("/health", response_model=Health, tags=["system"], summary="Liveness (no I/O)")
async def health() -> Health:
    return Health(status="ok")


@router.get(
    "/ready",
    response_model=Ready,
    tags=["system"],
    summary="Readiness: database, schema, embedded worker",
    responses={503: {"model": Ready, "description": "Not ready; `checks` says why"}},
)
async def ready(request: Request, conveyor: ConveyorDep, _principal: Authenticated) -> Ready | JSONResponse:
    checks: dict[str, str] = {}
    try:
        revision = await (await conveyor.store()).schema_revision()
        checks["database"] = "ok"
        head = migrate.head_revision()
        checks["schema"] = "ok" if revision == head else f"at {revision}, needs {head}"
    except ConveyorError as exc:
        checks["database"] = f"unreachable: {type(exc).__name__}"
    worker_task = request.app.state.worker_task
    if worker_task is not None:
        checks["worker"] = "ok" if not worker_task.done() else "stopped"
    if all(value == "ok" for value in checks.values()):
        return Ready(status="ready", checks=checks)
    return JSONResponse(Ready(status="not ready", checks=checks).model_dump(), status_code=503)


@router.get("/queues", response_model=QueuesPublic, tags=["queues"], summary="Queues with counts by state")
async def queues(conveyor: ConveyorDep, _principal: CanRead) -> QueuesPublic:
    now = conveyor.clock()
    found = []
    for stats in await conveyor.queue_stats():
        oldest = stats.oldest_runnable_at
        # Only jobs already due have waited; a queue of future jobs has no age yet.
        age = (now - oldest).total_seconds() if oldest and oldest <= now else None
        counts = {state.value: count for state, count in stats.counts.items()}
        found.append(QueuePublic(name=stats.queue, counts=counts, oldest_queued_age_seconds=age))
    return QueuesPublic(queues=found)


@router.get("/tasks", response_model=TasksPublic, tags=["tasks"], summary="Registered tasks and their arguments")
async def tasks(conveyor: ConveyorDep, _principal: CanRead) -> TasksPublic:
    found = []
    for task in sorted(conveyor.tasks.values(), key=lambda task: task.name):
        kind = "cpu" if task.options.cpu else "async" if task.is_async else "sync"
        found.append(
            TaskPublic(
                name=task.name,
                kind=kind,
                queue=task.options.queue,
                priority=task.options.priority,
                max_attempts=task.options.max_attempts or conveyor.settings.max_attempts,
                timeout_seconds=task.options.timeout,
                arguments_schema=task.arguments_schema(),
            )
        )
    return TasksPublic(tasks=found)


# The metrics are text, but errors are the JSON envelope as on every route: said explicitly,
# since FastAPI would document every response of a PlainTextResponse route as text/plain.
_METRICS_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/plain": {}}, "description": "Prometheus text exposition format"},
    **{
        status: {
            "description": response["description"],
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorEnvelope"}}},
        }
        for status, response in {**ERROR_RESPONSES, 404: {"description": "Metrics are turned off"}}.items()
    },
}


@router.get(
    "/metrics",
    tags=["system"],
    summary="Prometheus metrics",
    response_class=PlainTextResponse,
    responses=_METRICS_RESPONSES,
)
async def metrics(conveyor: ConveyorDep, _principal: Authenticated) -> PlainTextResponse:
    if not conveyor.settings.metrics_enabled:
        raise ApiError(404, "not_found", "metrics are turned off (CONVEYOR_METRICS_ENABLED=false)")
    await conveyor.metrics.refresh_queues(await conveyor.store(), conveyor.clock())
    return PlainTextResponse(conveyor.metrics.render(), media_type=CONTENT_TYPE)
