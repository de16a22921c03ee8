"""A span and metrics for every HTTP request, named by route template (never the raw path)."""

from __future__ import annotations

import time

from opentelemetry import propagate
from opentelemetry.trace import SpanKind
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from conveyor import tracing
from conveyor.metrics import Metrics


def _route_template(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    # Unmatched paths are user input: they all share one label value.
    return path if isinstance(path, str) else "unmatched"


class TelemetryMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics | None) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method = scope["method"]
        headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}
        status = 500
        started = time.perf_counter()

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        with tracing.tracer().start_as_current_span(
            method,
            context=propagate.extract(headers),
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method, "url.path": scope["path"]},
        ) as span:
            try:
                await self.app(scope, receive, recording_send)
            finally:
                route = _route_template(scope)
                span.update_name(f"{method} {route}")
                span.set_attribute("http.route", route)
                span.set_attribute("http.response.status_code", status)
                if status >= 500:  # noqa: PLR2004 - HTTP's server-error class
                    tracing.mark_failed(span, "HTTP", str(status))
                if self.metrics is not None:
                    self.metrics.http_requests.labels(method, route, str(status)).inc()
                    self.metrics.http_duration.labels(method, route).observe(time.perf_counter() - started)
