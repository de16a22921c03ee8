from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.id_generator import IdGenerator

_exporter = InMemorySpanExporter()


class _OwnRandomIds(IdGenerator):
    """The SDK's random ids, drawn from a generator of its own.

    The provider stays installed for the rest of the session, and the SDK's default draws from
    the process-wide `random`. Later tests whose app runs in another thread (schemathesis's)
    would then move that state while Hypothesis draws examples, which Hypothesis reports as a
    strategy using `random`.
    """

    def __init__(self) -> None:
        self._random = random.Random()

    def generate_span_id(self) -> int:
        return self._random.getrandbits(64) or 1

    def generate_trace_id(self) -> int:
        return self._random.getrandbits(128) or 1


@pytest.fixture(scope="session")
def _tracer_provider() -> None:
    """OpenTelemetry allows one global provider per process: set it once, keep spans in memory."""
    provider = TracerProvider(id_generator=_OwnRandomIds())
    provider.add_span_processor(SimpleSpanProcessor(_exporter))
    trace.set_tracer_provider(provider)


@pytest.fixture
def spans(_tracer_provider: None) -> Iterator[InMemorySpanExporter]:
    _exporter.clear()
    yield _exporter
    _exporter.clear()
