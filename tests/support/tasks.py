"""Tasks for tests that run real worker processes (``--app tests.support.tasks:app``).

Side effects go to the file named by ``CONVEYOR_TEST_EFFECTS``: one line per run, appended
with O_APPEND so concurrent processes never interleave a line. Tests count these lines, not
rows in the job table, to prove each job ran exactly once.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

from conveyor import CONTEXT, Conveyor, JobContext, PermanentError, constant

app = Conveyor()


def record(line: str) -> None:
    """Append one line to the effects file (atomic for short lines under O_APPEND)."""
    path = os.environ.get("CONVEYOR_TEST_EFFECTS")
    if not path:
        return
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{line}\n".encode())
    finally:
        os.close(fd)


def read_effects(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


@app.task
async def noop(n: int) -> int:
    return n


@app.task
async def effect(n: int, ctx: JobContext = CONTEXT) -> int:
    record(f"{ctx.job_id} {n}")
    return n


@app.task
async def slow_effect(seconds: float, ctx: JobContext = CONTEXT) -> float:
    """Records when it starts and when it finishes, so a test can see an interrupted run."""
    record(f"start {ctx.job_id} {ctx.attempt}")
    await asyncio.sleep(seconds)
    record(f"done {ctx.job_id} {ctx.attempt}")
    return seconds


@app.task(queue="limited")
async def timed(seconds: float, ctx: JobContext = CONTEXT) -> float:
    """Records when it starts and ends, in wall-clock seconds that every process shares."""
    record(f"start {ctx.job_id} {time.time():.6f}")
    await asyncio.sleep(seconds)
    record(f"end {ctx.job_id} {time.time():.6f}")
    return seconds


@app.task
def sync_effect(seconds: float, ctx: JobContext = CONTEXT) -> float:
    time.sleep(seconds)
    record(f"done {ctx.job_id} {ctx.attempt}")
    return seconds


# A second app, for workers that must respect a rate limit: on ``app`` it would put every
# other test's workers on the limited claim.
rated_app = Conveyor()
rated_app.task(name="effect")(effect.fn)


@rated_app.task(rate_limit="5/s")
async def rated(n: int, ctx: JobContext = CONTEXT) -> int:
    record(f"rated {ctx.job_id} {n}")
    return n


@app.task(max_attempts=3, backoff=constant(0.05))
async def always_fails(message: str) -> None:
    raise RuntimeError(message)


@app.task(cpu=True)
def cpu_square(n: int) -> int:
    return n * n


@app.task(cpu=True, max_attempts=2, backoff=constant(0))
def cpu_crash(code: int = 3) -> None:
    """Ends its own process the hard way, as a segfault or an OOM kill would."""
    os._exit(code)


@app.task(cpu=True, max_attempts=1)
def cpu_spin(seconds: float) -> str:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pass
    return "finished"


@app.task(max_attempts=1)
async def permanent_failure() -> None:
    raise PermanentError("this input can never work")


@app.task
async def until_marker(marker: str, ctx: JobContext = CONTEXT) -> str:
    """Records its start, then runs until the marker file exists: a job as long as a test needs."""
    record(f"start {ctx.job_id} {ctx.attempt}")
    while not Path(marker).exists():
        await asyncio.sleep(0.02)
    record(f"done {ctx.job_id} {ctx.attempt}")
    return "marker seen"


@app.task
async def collect(values: list[Any], ctx: JobContext = CONTEXT) -> int:
    """A chord callback: records that it ran and how many results it got."""
    record(f"collect {ctx.job_id} {len(values)}")
    return len(values)


@app.task(max_attempts=1)
async def fails_without_marker(marker: str) -> str:
    """Dead on a first run; succeeds once the marker file exists (e.g. replayed from the DLQ)."""
    if not Path(marker).exists():
        raise RuntimeError(f"marker {marker} does not exist yet")
    return "marker found"


@app.periodic("* * * * * *", queue="ticks", missed="catch_up")
async def every_second(ctx: JobContext = CONTEXT) -> None:
    """A tick job every second, made only by workers serving the ``ticks`` queue, so other tests see none."""
    record(f"tick {ctx.job_id}")
