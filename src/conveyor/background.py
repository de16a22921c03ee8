"""A task that a part of Conveyor keeps running while it is open: a listener, a watch, a poller."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable, Coroutine
from typing import Any


class Background:
    """Runs ``run()`` as one named asyncio task, from ``start`` until ``stop``."""

    def __init__(self, run: Callable[[], Coroutine[Any, Any, None]], *, name: str) -> None:
        self._run = run
        self._name = name
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the task, unless it is running already.

        In a context of its own: started lazily, from a request or a job, it would otherwise log
        with that request's or job's bound values (its correlation id) for as long as it runs.
        """
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=self._name, context=contextvars.Context())

    async def stop(self) -> None:
        """Cancel the task and wait until it has cleaned up; raise what it failed with, if it did.

        A cancel of the caller, arriving meanwhile, goes on up at once and leaves the task to
        finish its cleanup on its own. (Awaiting the task itself would pass that cancel on into
        the cleanup, and suppressing CancelledError around it would swallow the caller's.)
        """
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        await asyncio.wait([task])
        if not task.cancelled():
            task.result()
