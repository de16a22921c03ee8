"""The app factory: dependencies are built in the lifespan and handed to routes through app.state."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncGenerator

import structlog
from fastapi import FastAPI

from conveyor.api.correlation import CorrelationMiddleware
from conveyor.api.deps import AuthGate
from conveyor.api.errors import install_error_handlers
from conveyor.api.routes import jobs, schedules, system, workflows
from conveyor.api.telemetry import TelemetryMiddleware
from conveyor.api.watch import JobWatcher
from conveyor.app import Conveyor
from conveyor.engine.worker import Worker
from conveyor.tracing import configure_tracing

logger = structlog.get_logger("conveyor.api")


def create_app(conveyor: Conveyor, *, run_worker: bool = True, concurrency: int | None = None) -> FastAPI:
    """The HTTP API for ``conveyor``'s tasks and database, with an embedded worker unless told not to."""
    configure_tracing(conveyor.settings)

    @contextlib.asynccontextmanager
    async def lifespan(api: FastAPI) -> AsyncGenerator[None]:
        store = await conveyor.store()
        watcher = JobWatcher(store)
        watcher.start()
        api.state.watcher = watcher
        api.state.auth_gate = AuthGate(store)
        worker = Worker(conveyor, concurrency=concurrency) if run_worker else None
        api.state.worker_task = asyncio.create_task(worker.run(), name="conveyor-worker") if worker else None
        if worker is not None and api.state.worker_task is not None:
            # Serve once the worker runs (or has ended): a stop() before then is a no-op, so a
            # shutdown right after start-up would otherwise wait on a worker that never stops.
            started = asyncio.create_task(worker.started.wait())
            await asyncio.wait({api.state.worker_task, started}, return_when=asyncio.FIRST_COMPLETED)
            started.cancel()
            await asyncio.gather(started, return_exceptions=True)
        # What exists now (modules, the app and its routes, compiled schemas, the store) lives as
        # long as the server. Frozen, it is out of the collector's sight: a full collection then
        # walks what requests leave behind instead of some 140,000 objects that never die, each
        # time. Under load that walk cost more than a request's own work.
        gc.freeze()
        try:
            yield
        finally:
            gc.unfreeze()
            if worker is not None and api.state.worker_task is not None:
                worker.stop()
                await asyncio.gather(api.state.worker_task, return_exceptions=True)
            await watcher.stop()
            await conveyor.close()

    api = FastAPI(
        title="Conveyor",
        summary="Durable background jobs over HTTP",
        version=_version(),
        lifespan=lifespan,
        # Conveyor makes its own request spans and metrics (TelemetryMiddleware), with bounded
        # labels, on its own registry; FastAPI's built-in ones would count every request twice.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    api.state.conveyor = conveyor
    api.state.worker_task = None
    install_error_handlers(api)
    # The routers' routes become the app's own, not included routers: FastAPI (0.165) keeps an
    # included router as one route that matches each request against its routes twice, which
    # cost 17 µs of every `POST /jobs` and 23 µs of every `GET /jobs/{id}` (4 and 6 as the app's
    # own). Each route is complete as its router made it (prefix, tags, error responses, route
    # class); the app has nothing to add. Jobs go first: a request tries the routes in order.
    for router in (jobs.router, system.router, schedules.router, workflows.router):
        api.router.routes.extend(router.routes)
    # Added innermost first: telemetry wraps everything, then the correlation id exists
    # before a size check can answer 413.
    api.add_middleware(CorrelationMiddleware, max_bytes=conveyor.settings.max_request_bytes)
    api.add_middleware(TelemetryMiddleware, metrics=conveyor.metrics if conveyor.settings.metrics_enabled else None)
    return api


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415 - only at start-up

    try:
        return version("conveyor")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree without metadata
        return "0.0.0"
