"""OpenTelemetry: spans for HTTP requests, enqueues and attempts, joined into one trace.

The enqueue's context is stored on the job (W3C ``traceparent``), so each attempt, whenever
and wherever it runs, continues that trace and links to the enqueue. Exporting is off unless
``CONVEYOR_OTEL_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set (OTLP over HTTP) or
``CONVEYOR_OTEL_CONSOLE`` is true.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

from opentelemetry import propagate, trace
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode

if TYPE_CHECKING:
    from conveyor.jobs import Job
    from conveyor.settings import Settings

_configured = False


def tracer() -> trace.Tracer:
    return trace.get_tracer("conveyor")


def configure_tracing(settings: Settings) -> None:
    """Install an SDK tracer provider once per process, if exporting was asked for."""
    global _configured  # noqa: PLW0603 - the SDK is process-wide by design
    endpoint = settings.otel_endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if _configured or not (endpoint or settings.otel_console):
        return
    from opentelemetry.sdk.resources import Resource  # noqa: PLC0415 - only when exporting
    from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter  # noqa: PLC0415

    provider = TracerProvider(resource=Resource.create({"service.name": settings.otel_service_name}))
    if endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # noqa: PLC0415

        traces = endpoint.rstrip("/") + "/v1/traces" if settings.otel_endpoint else None
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=traces, timeout=10)))
    if settings.otel_console:
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    trace.set_tracer_provider(provider)
    _configured = True


def current_context_carrier() -> dict[str, str] | None:
    """The current trace context as W3C headers (``traceparent``), or None outside a trace."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier or None


def tracing_installed() -> bool:
    """Whether any tracer provider was installed (by Conveyor or the application)."""
    return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


@contextlib.contextmanager
def attempt_span(job: Job, worker: str) -> Generator[Span]:
    """The span of one attempt: a child of the enqueue's trace, and linked to the enqueue.

    With no tracer provider installed every span would be a no-op, yet building one (context
    extraction, attributes, attach and detach) costs more than a no-op job: skip it.
    """
    if not tracing_installed():
        yield trace.INVALID_SPAN
        return
    parent = propagate.extract(job.trace_context or {})
    enqueue = trace.get_current_span(parent).get_span_context()
    links = [Link(enqueue)] if enqueue.is_valid else []
    attributes: dict[str, Any] = {
        "messaging.system": "conveyor",
        "messaging.destination.name": job.queue,
        "messaging.message.id": job.id,
        "conveyor.task": job.task,
        "conveyor.attempt": job.attempt,
        "conveyor.worker": worker,
    }
    with tracer().start_as_current_span(
        f"run {job.task}", context=parent, kind=SpanKind.CONSUMER, links=links, attributes=attributes
    ) as span:
        yield span


def mark_failed(span: Span, error_type: str, message: str) -> None:
    span.set_status(Status(StatusCode.ERROR, f"{error_type}: {message}"))
