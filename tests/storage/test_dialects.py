"""Hand-written SQLite SQL stores values exactly as the schema's column types would."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy.dialects import sqlite

from conveyor.storage import dialects
from conveyor.storage.schema import jobs

TIMES = [
    datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC),
    datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC),  # no microseconds: still written out
    datetime(2026, 3, 1, 23, 30, tzinfo=timezone(timedelta(hours=-5))),  # another day in UTC
    datetime(987, 6, 5, 4, 3, 2, 1, tzinfo=UTC),  # a year of three digits
]


@pytest.mark.parametrize("value", TIMES, ids=str)
def test_a_time_in_hand_written_sql_is_the_text_the_column_type_stores(value: datetime) -> None:
    dialect = sqlite.dialect()
    store = jobs.c.run_at.type.dialect_impl(dialect).bind_processor(dialect)
    assert store is not None

    assert dialects.sqlite_text(value) == store(value)
