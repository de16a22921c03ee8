from __future__ import annotations

from collections.abc import Iterator

import pytest
from tests.support.processes import WorkerProcess


@pytest.fixture
def database_url(backend_url: str) -> str:
    """Every test here runs on SQLite and on PostgreSQL."""
    return backend_url


@pytest.fixture
def fleet() -> Iterator[list[WorkerProcess]]:
    """Worker processes a test starts; any still running at its end are killed."""
    started: list[WorkerProcess] = []
    yield started
    for worker in started:
        worker.kill()
