"""Tasks the benchmarks run (``--app benchmarks.tasks:app``)."""

from __future__ import annotations

import asyncio

from conveyor import Conveyor

app = Conveyor()


@app.task
async def noop() -> None:
    return None


@app.task
async def sleep(seconds: float) -> None:
    await asyncio.sleep(seconds)
