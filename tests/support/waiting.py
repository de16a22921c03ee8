"""Waiting with a deadline where waiting is unavoidable (another process is doing the work)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from conveyor.storage import Store

T = TypeVar("T")


async def eventually(check: Callable[[], Awaitable[T | None]], *, timeout: float = 30, interval: float = 0.05) -> T:
    """Await ``check`` until it returns something other than None (or False), or fail at the deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: T | None = None
    while loop.time() < deadline:
        last = await check()
        if last is not None and last is not False:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s (last value: {last!r})")


async def settle(store: Store) -> None:
    """Start a store listening for news and forget past wake-ups.

    A PostgreSQL store's listener wakes the store once it has connected, and a SQLite store's
    commit watch once it is in place: both are waited for, so that no wake-up of theirs comes later.
    """
    await store.wait_for_jobs(0)  # a store listens from its first wait
    listener = getattr(store, "_listener", None)
    if listener is not None:
        await asyncio.wait_for(listener.connected.wait(), 30)
    watch = getattr(store, "_commit_watch", None)
    if watch is not None:
        await asyncio.wait_for(asyncio.shield(watch.ready), 30)
    await store.wait_for_jobs(0)
