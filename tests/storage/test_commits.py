"""Commits to a SQLite file by any connection wake whoever watches it; other files in its folder do not."""

from __future__ import annotations

import asyncio
import sqlite3
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import structlog

from conveyor.storage.commits import CommitWatch

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="inotify is Linux's")


@pytest.fixture
def database(tmp_path: Path) -> Path:
    path = tmp_path / "jobs.db"
    db = sqlite3.connect(path)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE t (x INTEGER)")
    finally:
        db.close()
    return path


@pytest.fixture
async def woken(database: Path) -> AsyncIterator[asyncio.Event]:
    event = asyncio.Event()
    watch = CommitWatch(database, event.set)
    watch.start()
    assert await asyncio.wait_for(watch.ready, 5)
    await asyncio.wait_for(event.wait(), 5)  # the wake-up for commits made before the watch began
    event.clear()
    yield event
    await watch.stop()


def commit(database: Path) -> None:
    # A connection of its own, as another process's would be. Closing the last connection
    # checkpoints the WAL and deletes it; the next commit creates it again.
    db = sqlite3.connect(database)
    try:
        with db:
            db.execute("INSERT INTO t VALUES (1)")
    finally:
        db.close()


async def test_a_commit_by_another_connection_wakes_the_watcher(database: Path, woken: asyncio.Event) -> None:
    await asyncio.to_thread(commit, database)

    await asyncio.wait_for(woken.wait(), 5)


async def test_writes_to_other_files_in_the_folder_do_not_wake_it(database: Path, woken: asyncio.Event) -> None:
    (database.parent / "notes.txt").write_text("not the database")
    (database.parent / "other.db-wal").write_bytes(b"another database's log")

    with pytest.raises(TimeoutError):
        await asyncio.wait_for(woken.wait(), 0.2)
    await asyncio.to_thread(commit, database)
    await asyncio.wait_for(woken.wait(), 5)


async def test_commits_close_together_wake_it_again_after_the_pause(database: Path, woken: asyncio.Event) -> None:
    await asyncio.to_thread(commit, database)
    await asyncio.wait_for(woken.wait(), 5)
    woken.clear()
    # During the pause after a wake-up: the kernel holds the event, and it is read at the pause's end.
    await asyncio.to_thread(commit, database)

    await asyncio.wait_for(woken.wait(), 5)


async def test_writes_to_a_wal_created_again_after_its_deletion_wake_it(database: Path, woken: asyncio.Event) -> None:
    await asyncio.to_thread(commit, database)  # and close: the last connection's close deletes the WAL
    await asyncio.wait_for(woken.wait(), 5)
    woken.clear()
    assert not database.with_name("jobs.db-wal").exists()

    db = sqlite3.connect(database, check_same_thread=False)
    try:
        for _ in range(3):  # the first creates the WAL again; the others write to the new file
            await asyncio.to_thread(_insert, db)
            await asyncio.wait_for(woken.wait(), 5)
            woken.clear()
    finally:
        db.close()


def _insert(db: sqlite3.Connection) -> None:
    with db:
        db.execute("INSERT INTO t VALUES (2)")


async def test_a_commit_made_before_the_watch_is_in_place_is_looked_for_as_it_starts(database: Path) -> None:
    # A worker looks for jobs, finds none, and then starts to watch: a commit in between would
    # otherwise wait for the next poll.
    await asyncio.to_thread(commit, database)
    event = asyncio.Event()
    watch = CommitWatch(database, event.set)
    watch.start()
    try:
        await asyncio.wait_for(event.wait(), 5)
    finally:
        await watch.stop()


async def test_a_folder_that_cannot_be_watched_is_logged_and_leaves_polling_to_the_worker(tmp_path: Path) -> None:
    watch = CommitWatch(tmp_path / "missing" / "jobs.db", lambda: None)
    with structlog.testing.capture_logs() as logs:
        watch.start()
        ready = await asyncio.wait_for(watch.ready, 5)
    await watch.stop()

    assert ready is False
    assert [entry["event"] for entry in logs] == ["storage.commit_watch_unavailable"]
