"""Other processes' commits to a SQLite database, seen as they happen (Linux: inotify).

SQLite has no NOTIFY. In WAL mode every commit appends to ``<database>-wal``, so a watch on that
file learns of commits by any process within microseconds, where a worker that only polls
finds them up to a poll interval late. Where inotify is missing (not Linux, or the system's
watch limit is reached) nothing is watched and workers poll as before.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from conveyor.background import Background

logger = structlog.get_logger("conveyor.storage")

SPACING_SECONDS = 0.005
"""Least time between two wake-ups. A process storing thousands of jobs a second would otherwise
have an idle worker look for jobs on every commit; a commit seen during the pause still wakes it
at the pause's end (the kernel keeps the event until it is read)."""


class CommitWatch:
    """Calls ``on_commit`` soon after any process writes to the SQLite database at ``path``.

    It also calls it once as the watch starts (for commits made just before), and for this
    process's own commits: a wake-up costs a worker one cheap read.
    """

    def __init__(self, path: Path, on_commit: Callable[[], None]) -> None:
        self._directory = path.parent
        self._wal = path.with_name(f"{path.name}-wal")
        self._on_commit = on_commit
        self._background = Background(self._run, name="conveyor-sqlite-commit-watch")
        self.ready: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        """True once the watch is in place (commits from then on are seen), False if it cannot be."""

    def start(self) -> None:
        self._background.start()

    async def stop(self) -> None:
        if not self.ready.done():
            self.ready.cancel()
        await self._background.stop()

    async def _run(self) -> None:
        try:
            from asyncinotify import Inotify, Mask  # noqa: PLC0415 - Linux only
        except (ImportError, OSError):
            self.ready.set_result(False)
            return
        try:
            with Inotify() as inotify:
                # The WAL file's writes, and the folder only for files that appear in it: SQLite
                # deletes the WAL when its last connection closes and creates it again on the next
                # write, and a folder's every write (logs kept next to the database) would cost a read.
                inotify.add_watch(self._directory, Mask.CREATE | Mask.MOVED_TO | Mask.ONLYDIR)
                self._watch_wal(inotify, Mask.MODIFY)
                self.ready.set_result(True)
                # A commit between the worker's last look and this moment went unseen.
                self._on_commit()
                async for event in inotify:
                    if event.name is not None:
                        if event.name.name != self._wal.name:
                            continue
                        self._watch_wal(inotify, Mask.MODIFY)
                    # The WAL's own events: a write, or its deletion (which needs no wake-up); an
                    # overflow of the kernel's queue may have dropped a commit's event.
                    elif not (Mask.MODIFY in event.mask or Mask.Q_OVERFLOW in event.mask):
                        continue
                    self._on_commit()
                    await asyncio.sleep(SPACING_SECONDS)
        except OSError as exc:
            if not self.ready.done():
                self.ready.set_result(False)
            # Workers still poll: new jobs are found, only later.
            logger.warning("storage.commit_watch_unavailable", directory=str(self._directory), error=str(exc))

    def _watch_wal(self, inotify: Any, modify: Any) -> None:
        with contextlib.suppress(FileNotFoundError):  # not yet created, or deleted again at once
            inotify.add_watch(self._wal, modify)
