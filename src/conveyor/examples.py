"""Example tasks that ship with Conveyor, so the quick start has something to run.

conveyor worker --app conveyor.examples:app
conveyor enqueue add --args '[2, 3]' --wait
"""

from __future__ import annotations

import asyncio
import random

from conveyor import CONTEXT, Conveyor, JobContext, PermanentError

app = Conveyor()


@app.task
async def add(a: float, b: float) -> float:
    """Add two numbers."""
    return a + b


@app.task
async def sleep(seconds: float = 1.0) -> float:
    """Sleep without blocking the worker, then return how long it slept."""
    await asyncio.sleep(seconds)
    return seconds


@app.task
def word_count(text: str) -> int:
    """A plain (sync) function: it runs in a thread."""
    return len(text.split())


@app.task(cpu=True, timeout=60)
def fibonacci(n: int) -> int:
    """CPU-bound work: it runs in a process of its own."""
    if n < 0:
        raise PermanentError("n must not be negative")
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


@app.task(max_attempts=3)
async def flaky(failure_rate: float = 0.5, ctx: JobContext = CONTEXT) -> str:
    """Fails at random, to watch retries and the dead-letter queue at work."""
    ctx.logger.info("flaky.attempt", failure_rate=failure_rate)
    if random.random() < failure_rate:  # noqa: S311 - a demo, not cryptography
        raise RuntimeError("the coin came up tails")
    return "heads"
