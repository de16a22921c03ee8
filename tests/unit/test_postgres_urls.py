"""TLS options in PostgreSQL URLs reach both the pool and the LISTEN connection."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from conveyor.settings import load_settings
from conveyor.storage import dialects, postgres


@pytest.mark.parametrize("option", ["sslmode=require", "ssl=require"])
async def test_the_pool_gets_ssl_and_the_listener_gets_sslmode(option: str) -> None:
    settings = load_settings(database_url=f"postgresql://u:secret@db.internal:5432/jobs?{option}")
    engine = dialects.create_engine(settings)
    try:
        assert dict(engine.url.query) == {"ssl": "require"}
    finally:
        await engine.dispose()
    dsn = postgres.asyncpg_dsn(sa.make_url(settings.database_url))
    assert dsn == "postgresql://u:secret@db.internal:5432/jobs?sslmode=require"
