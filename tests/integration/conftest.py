from __future__ import annotations

import pytest


@pytest.fixture
def database_url(backend_url: str) -> str:
    """Every test here runs on SQLite and on PostgreSQL."""
    return backend_url
