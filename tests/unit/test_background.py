"""A background task stops cleanly, once, without swallowing a cancel meant for whoever stops it."""

from __future__ import annotations

import asyncio

import pytest
import structlog

from conveyor.background import Background


class Lingering:
    """A run that, once cancelled, takes its time to clean up: until ``finish`` is set."""

    def __init__(self) -> None:
        self.runs = 0
        self.started = asyncio.Event()
        self.cleaning = asyncio.Event()
        self.finish = asyncio.Event()
        self.cleaned_up = asyncio.Event()

    async def __call__(self) -> None:
        self.runs += 1
        self.started.set()
        try:
            await asyncio.Event().wait()
        finally:
            self.cleaning.set()
            await self.finish.wait()
            self.cleaned_up.set()


async def test_stop_cancels_the_task_and_returns_once_it_has_cleaned_up() -> None:
    run = Lingering()
    background = Background(run, name="lingering")
    background.start()
    background.start()
    await run.started.wait()

    stopping = asyncio.create_task(background.stop())
    await run.cleaning.wait()
    assert not stopping.done()
    run.finish.set()
    await stopping

    assert run.cleaned_up.is_set()
    assert run.runs == 1, "a second start while running starts nothing"
    await background.stop()  # stopping again is harmless


async def test_a_cancel_of_the_caller_while_it_waits_for_the_task_goes_on_up() -> None:
    run = Lingering()
    background = Background(run, name="lingering")
    background.start()
    await run.started.wait()
    stopping = asyncio.create_task(background.stop())
    await run.cleaning.wait()

    stopping.cancel()
    run.finish.set()

    with pytest.raises(asyncio.CancelledError):
        await stopping
    await asyncio.wait_for(run.cleaned_up.wait(), 5)  # the task, cancelled already, finishes on its own


async def test_stop_before_the_task_ever_ran_is_harmless() -> None:
    run = Lingering()
    background = Background(run, name="lingering")
    background.start()

    await background.stop()

    assert run.runs == 0


async def test_the_task_runs_outside_the_context_of_whoever_started_it() -> None:
    seen: list[object] = []
    ran = asyncio.Event()

    async def run() -> None:
        seen.append(structlog.contextvars.get_contextvars().get("correlation_id"))
        ran.set()

    background = Background(run, name="contextless")
    structlog.contextvars.bind_contextvars(correlation_id="the request that happened to start it")
    try:
        background.start()
    finally:
        structlog.contextvars.clear_contextvars()
    await asyncio.wait_for(ran.wait(), 5)
    await background.stop()

    assert seen == [None]
