"""Hand-written SQL stores values exactly as the schema's column types and the models would."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy.dialects import sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from conveyor.jobs import AttemptRecord, JobError, Outcome
from conveyor.settings import Settings
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


_ERROR = JobError("ValueError", "boom", "Traceback (most recent call last): ...")
RECORDS = [
    AttemptRecord(1, "host:1:abc", TIMES[0], TIMES[0] + timedelta(seconds=1), Outcome.SUCCEEDED),
    AttemptRecord(2, None, None, TIMES[1], Outcome.FAILED, _ERROR),
    AttemptRecord(3, "host:1:abc", TIMES[2], TIMES[2], Outcome.RELEASED),
    _ERROR,
    JobError("TimeoutError", "late"),
]


@pytest.mark.parametrize("value", RECORDS, ids=repr)
def test_an_ack_writes_records_and_errors_as_their_to_json(value: AttemptRecord | JobError) -> None:
    # The ack statements hand the dataclasses to dumps as they are (dialects.postgres_ack_batch); what
    # lands in the history must be what to_json builds and from_json reads back.
    assert orjson.loads(dialects.dumps(value)) == value.to_json()
    # With an integer over 64 bits in the batch (a result), the standard library writes it all.
    assert orjson.loads(dialects.dumps([value, 2**70]).replace(str(2**70), "0")) == [value.to_json(), 0]


async def _driver(conn: AsyncConnection) -> Any:
    raw = (await conn.get_raw_connection()).driver_connection
    assert raw is not None
    return raw


async def test_a_sqlite_connection_given_back_inside_a_transaction_is_rolled_back(tmp_path: Path) -> None:
    # The pool no longer rolls back every connection it takes back (a call into the connection's
    # thread each time), only one that SQLite says is still inside a transaction.
    engine = dialects.create_engine(Settings(database_url=f"sqlite:///{tmp_path / 'reset.db'}"))
    try:
        async with engine.connect() as conn:
            raw = await _driver(conn)
            await raw.execute("CREATE TABLE notes (text TEXT)")
        async with engine.connect() as conn:
            raw = await _driver(conn)
            await raw.execute("BEGIN IMMEDIATE")
            await raw.execute("INSERT INTO notes VALUES ('left open')")
            assert raw.in_transaction

        assert not raw.in_transaction, "rolled back as it came back"
        async with engine.connect() as conn:
            raw = await _driver(conn)
            # The write lock was let go: a write of its own goes through at once.
            await raw.execute("INSERT INTO notes VALUES ('written')")
            rows = await (await raw.execute("SELECT text FROM notes")).fetchall()
    finally:
        await engine.dispose()

    assert [row[0] for row in rows] == ["written"]
