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
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE t (x INTEGER)")
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
    # A connection of its own, as another process's would be; it stays open so the WAL is kept.
    db = sqlite3.connect(database)
    db.execute("PRAGMA journal_mode=WAL")
    with db:
        db.execute("INSERT INTO t VALUES (1)")


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
