"""A PostgreSQL restart under a busy server: nothing lost, recovery on its own, /ready tells."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from tests.support import tasks as support
from tests.support.private_postgres import PrivatePostgres, free_port
from tests.support.processes import REPO_ROOT, worker_env
from tests.support.waiting import eventually

from conveyor import Conveyor, JobState

pytestmark = [pytest.mark.integration, pytest.mark.postgres, pytest.mark.slow]


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    server = PrivatePostgres()
    try:
        server.start()
        yield server
    finally:
        server.destroy()


async def test_a_postgres_restart_loses_no_job_and_readiness_follows_it(
    tmp_path: Path, private_postgres: PrivatePostgres, effects_path: Path
) -> None:
    port = free_port()
    env = worker_env(
        private_postgres.url,
        auto_migrate="true",
        lease_seconds="3",
        poll_interval_seconds="0.2",
        concurrency="4",
    )
    env["CONVEYOR_TEST_EFFECTS"] = str(effects_path)
    log = (tmp_path / "serve.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "conveyor", "serve", "--app", "tests.support.tasks:app", "--port", str(port)],
        env=env,
        cwd=REPO_ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    app = Conveyor(database_url=private_postgres.url)
    slow_effect = app.task(name="slow_effect")(support.slow_effect.fn)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:

            async def ready_status() -> int | None:
                try:
                    return (await client.get("/ready")).status_code
                except httpx.TransportError:
                    return None

            await eventually(lambda: _is(ready_status(), 200), timeout=60)
            jobs = await app.enqueue_many([slow_effect.job(0.3) for _ in range(30)])
            await eventually(lambda: _done_at_least(effects_path, 4), timeout=60)
            await app.close()

            private_postgres.stop()
            await eventually(lambda: _is(ready_status(), 503), timeout=30)
            assert server.poll() is None, "the server rides out the outage"

            private_postgres.start()
            await eventually(lambda: _is(ready_status(), 200), timeout=90)

            async def all_succeeded() -> bool:
                states = [(await client.get(f"/jobs/{job.id}")).json()["state"] for job in jobs]
                return all(state == JobState.SUCCEEDED.value for state in states)

            await eventually(all_succeeded, timeout=120, interval=0.5)
        done = collections.Counter(
            line.split()[1] for line in support.read_effects(effects_path) if line.startswith("done")
        )
        assert set(done) == {job.id for job in jobs}, "every job ran to the end at least once"
    finally:
        await app.close()
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
        exit_code = server.wait(60)
        log.close()
    assert exit_code == 0, (tmp_path / "serve.log").read_text()[-3000:]
    os.sync()


async def _is(value_coroutine, expected: int) -> bool:
    return (await value_coroutine) == expected


async def _done_at_least(effects_path: Path, count: int) -> bool:
    return sum(line.startswith("done") for line in support.read_effects(effects_path)) >= count
