"""Long-poll support: many clients wait on jobs; one query per interval asks about all of them."""

from __future__ import annotations

import asyncio
import contextlib

import structlog

from conveyor.background import Background
from conveyor.errors import ConveyorError
from conveyor.storage import Store

logger = structlog.get_logger("conveyor.api")


class JobWatcher:
    """Wakes waiters when their job finishes.

    Jobs finished through this process's store (the embedded worker, cancels) wake waiters at
    once, and so do PostgreSQL's notifications of jobs finished elsewhere. Otherwise one batched
    query for all waiting clients, however many, finds them: every ``interval``, and (SQLite on
    Linux) soon after another process commits, at most once per ``spacing``. Waiting clients
    never poll the database one by one.
    """

    def __init__(self, store: Store, *, interval: float = 0.2, spacing: float = 0.02) -> None:
        self._store = store
        self._interval = interval
        self._spacing = spacing
        self._changed = asyncio.Event()
        self._watching_commits = False
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}
        self._background = Background(self._run, name="conveyor-job-watcher")
        self._released = False
        store.on_jobs_finished(self._wake)

    def start(self) -> None:
        self._background.start()

    async def stop(self) -> None:
        await self._background.stop()
        for futures in self._waiters.values():
            for future in futures:
                future.cancel()
        self._waiters.clear()

    def release_all(self) -> None:
        """Return every wait now, and every later one at once: the server is stopping.

        Held long-polls would otherwise keep their connections open through the server's whole
        graceful timeout and then be cut off; released, they answer with the job as it stands.
        """
        self._released = True
        for futures in self._waiters.values():
            for future in futures:
                if not future.done():
                    future.set_result(None)

    async def wait(self, job_id: str, timeout: float) -> None:
        """Return when the job finishes or ``timeout`` seconds pass, whichever is first."""
        if self._released:
            return
        if not self._watching_commits:
            self._watching_commits = True
            self._store.on_commits(self._changed.set)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(job_id, set()).add(future)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(future, timeout)
        finally:
            waiting = self._waiters.get(job_id)
            if waiting is not None:
                waiting.discard(future)
                if not waiting:
                    del self._waiters[job_id]

    def _wake(self, job_ids: set[str]) -> None:
        for job_id in job_ids:
            for future in self._waiters.get(job_id, ()):
                if not future.done():
                    future.set_result(None)

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), self._interval)
            self._changed.clear()
            if not self._waiters:
                continue
            try:
                self._wake(await self._store.finished_among(list(self._waiters)))
            except ConveyorError as exc:
                logger.warning("api.watch_failed", error=str(exc))
            # A busy database commits hundreds of times a second; one query per pause answers them all.
            await asyncio.sleep(self._spacing)
