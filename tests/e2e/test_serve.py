"""``conveyor serve`` as a real process: HTTP over loopback, its own SQLite file, stopped with SIGTERM."""

from __future__ import annotations

import asyncio
import collections
import json
import shutil
import signal
import socket
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.support import tasks as support
from tests.support.processes import WorkerProcess
from tests.support.server import ServerProcess, run_cli
from tests.support.waiting import eventually

from conveyor import Conveyor, JobState, Outcome
from conveyor.engine.worker import Worker

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FINISHED = {"succeeded", "dead", "cancelled"}
LONG_POLL = 30

StartServer = Callable[..., Awaitable[ServerProcess]]


@pytest.fixture
def database_url(tmp_path: Path, migrated_sqlite_template: Path) -> str:
    """The server's own SQLite file, migrated already (the server would migrate it, only slower)."""
    path = tmp_path / "conveyor.db"
    shutil.copyfile(migrated_sqlite_template, path)
    return f"sqlite:///{path}"


@pytest.fixture
def processes() -> Iterator[list[ServerProcess | WorkerProcess]]:
    """Servers and workers started by the test; any still running at the end are killed."""
    started: list[ServerProcess | WorkerProcess] = []
    yield started
    for process in started:
        process.kill()
        if isinstance(process, ServerProcess):
            # Captured, so shown only when the test fails.
            print(f"--- {process.log_path.name} (exit {process.process.returncode}) ---\n{process.log_tail()}")


@pytest.fixture
def start_server(tmp_path: Path, database_url: str, processes: list[ServerProcess | WorkerProcess]) -> StartServer:
    async def start(*args: str, **settings: str) -> ServerProcess:
        settings.setdefault("poll_interval_seconds", "0.05")
        server = ServerProcess(tmp_path / f"server-{len(processes)}.log", database_url, args, **settings)
        processes.append(server)
        await server.wait_ready()
        return server

    return start


async def long_poll(client: httpx.AsyncClient, job_id: str, *, timeout: float = 60) -> dict[str, Any]:
    """``GET /jobs/{id}?wait=30`` until the job is finished; the server holds each call, we do not sleep."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        response = await client.get(f"/jobs/{job_id}", params={"wait": LONG_POLL}, timeout=LONG_POLL + 10)
        assert response.status_code == 200, response.text
        job = response.json()
        if job["state"] in FINISHED:
            return job
        assert loop.time() < deadline, f"job {job_id} not finished within {timeout}s: {job}"


async def held_until_finished(client: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    """One ``GET /jobs/{id}?wait=60`` (the most the API allows): the job as the server answered."""
    response = await client.get(f"/jobs/{job_id}", params={"wait": 60}, timeout=75)
    assert response.status_code == 200, response.text
    return response.json()


async def submit(client: httpx.AsyncClient, task: str, **body: Any) -> dict[str, Any]:
    response = await client.post("/jobs", json={"task": task, **body})
    assert response.status_code == 202, response.text
    return response.json()


async def test_five_hundred_jobs_submitted_over_http_each_run_exactly_once(
    start_server: StartServer, effects_path: Path
) -> None:
    server = await start_server("--concurrency", "20")
    limiter = asyncio.Semaphore(20)
    async with server.client() as client:

        async def submit_one(n: int) -> str:
            async with limiter:
                return (await submit(client, "effect", args=[n]))["id"]

        async def outcome(job_id: str) -> dict[str, Any]:
            async with limiter:
                return await long_poll(client, job_id)

        ids = await asyncio.gather(*(submit_one(n) for n in range(500)))
        assert len(set(ids)) == 500
        jobs = await asyncio.gather(*(outcome(job_id) for job_id in ids))
    assert server.stop() == 0

    assert [(job["state"], job["attempt"], job["result"]) for job in jobs] == [("succeeded", 1, n) for n in range(500)]
    # The task's own side effect, not the job table: one line per run.
    lines = support.read_effects(effects_path)
    runs = collections.Counter(line.split()[0] for line in lines)
    assert len(lines) == 500, "every job ran, and none twice"
    assert runs == dict.fromkeys(ids, 1)
    assert {line.split()[0]: int(line.split()[1]) for line in lines} == {job_id: n for n, job_id in enumerate(ids)}


async def test_a_dead_job_shows_its_failed_attempts_and_retry_runs_it_again(
    start_server: StartServer, tmp_path: Path
) -> None:
    server = await start_server()
    async with server.client() as client:
        failing = await submit(client, "always_fails", kwargs={"message": "boom"})
        dead = await long_poll(client, failing["id"])
        assert (dead["state"], dead["attempt"], dead["max_attempts"]) == ("dead", 3, 3)
        assert dead["error"] == {"type": "RuntimeError", "message": "boom"}
        attempts = (await client.get(f"/jobs/{failing['id']}/attempts")).json()
        assert attempts["job_id"] == failing["id"]
        assert [(a["attempt"], a["outcome"], a["error"]["message"]) for a in attempts["attempts"]] == [
            (1, "failed", "boom"),
            (2, "failed", "boom"),
            (3, "failed", "boom"),
        ]

        revived = await client.post(f"/jobs/{failing['id']}/retry")
        assert revived.status_code == 200, revived.text
        assert (revived.json()["state"], revived.json()["attempt"]) == ("queued", 0)
        dead_again = await long_poll(client, failing["id"])
        assert (dead_again["state"], dead_again["attempt"]) == ("dead", 3), "a retry gets the full attempts again"
        history = (await client.get(f"/jobs/{failing['id']}/attempts")).json()["attempts"]
        assert [a["attempt"] for a in history] == [1, 2, 3, 1, 2, 3]

        marker = tmp_path / "fixed"
        fixable = await submit(client, "fails_without_marker", args=[str(marker)])
        assert (await long_poll(client, fixable["id"]))["state"] == "dead"
        marker.touch()
        retried = await client.post(f"/jobs/{fixable['id']}/retry")
        assert retried.status_code == 200, retried.text
        assert retried.json()["state"] == "queued"
        fixed = await long_poll(client, fixable["id"])
        assert (fixed["state"], fixed["attempt"], fixed["result"]) == ("succeeded", 1, "marker found")
        history = (await client.get(f"/jobs/{fixable['id']}/attempts")).json()["attempts"]
        assert [a["outcome"] for a in history] == ["failed", "succeeded"]

        again = await client.post(f"/jobs/{fixable['id']}/retry")
        assert again.status_code == 409
        assert again.json()["error"]["code"] == "job_state_conflict"
    assert server.stop() == 0


async def test_twenty_concurrent_submits_with_one_idempotency_key_make_one_job(start_server: StartServer) -> None:
    server = await start_server()
    body = {"task": "noop", "args": [7]}
    key = {"Idempotency-Key": "order-42"}
    async with server.client() as client:
        responses = await asyncio.gather(*(client.post("/jobs", json=body, headers=key) for _ in range(20)))
        statuses = collections.Counter(response.status_code for response in responses)
        assert statuses == {202: 1, 200: 19}, [response.text for response in responses]
        assert len({response.json()["id"] for response in responses}) == 1
        job_id = responses[0].json()["id"]
        for response in responses:
            replayed = response.headers.get("Idempotent-Replayed")
            assert replayed == ("true" if response.status_code == 200 else None)
            assert response.json()["idempotency_key"] == "order-42"

        listed = (await client.get("/jobs", params={"task": "noop"})).json()
        assert [job["id"] for job in listed["jobs"]] == [job_id]

        changed = await client.post("/jobs", json={"task": "noop", "args": [8]}, headers=key)
        assert changed.status_code == 422
        error = changed.json()["error"]
        assert (error["code"], error["details"]) == ("idempotency_key_reused", {"job_id": job_id})
        assert error["correlation_id"] == changed.headers["X-Correlation-ID"]
        assert set(changed.json()) == {"error"}
        listed = (await client.get("/jobs", params={"task": "noop"})).json()
        assert [job["id"] for job in listed["jobs"]] == [job_id]
    assert server.stop() == 0


def create_token(database_url: str, name: str, scope: str) -> dict[str, Any]:
    created = run_cli(database_url, "tokens", "create", "--name", name, "--scope", scope, "--json")
    assert created.returncode == 0, created.stderr
    return json.loads(created.stdout)


async def test_tokens_from_the_cli_guard_the_running_server_and_never_leak(
    start_server: StartServer, database_url: str, tmp_path: Path
) -> None:
    reader, admin = await asyncio.gather(
        asyncio.to_thread(create_token, database_url, "t", "jobs:read"),
        asyncio.to_thread(create_token, database_url, "ops", "admin"),
    )
    assert reader["scopes"] == ["jobs:read"]
    # DEBUG logs everything the server logs (SQL included): the token must not be among it.
    server = await start_server(log_level="DEBUG")
    async with (
        server.client() as anonymous,
        server.client(reader["token"]) as reading,
        server.client(admin["token"]) as admin_client,
    ):
        for response in (await anonymous.get("/jobs"), await anonymous.post("/jobs", json={"task": "noop"})):
            assert response.status_code == 401
            assert response.json()["error"]["code"] == "unauthorized"
            assert response.headers["WWW-Authenticate"] == "Bearer"

        job = await submit(admin_client, "noop", args=[1])
        forbidden = await reading.post("/jobs", json={"task": "noop", "args": [2]})
        assert forbidden.status_code == 403
        assert forbidden.json()["error"]["code"] == "forbidden"
        assert forbidden.json()["error"]["details"] == {"needed": "jobs:write"}
        allowed = await reading.get(f"/jobs/{job['id']}")
        assert allowed.status_code == 200
        assert allowed.json()["id"] == job["id"]
        assert (await reading.get("/jobs")).status_code == 200

        revoked = run_cli(database_url, "tokens", "revoke", reader["id"])
        assert revoked.returncode == 0, revoked.stderr
        after = await reading.get("/jobs")
        assert after.status_code == 401, "a revoked token is refused at once, not after a cache expires"
        assert after.json()["error"]["code"] == "unauthorized"
        assert (await anonymous.get("/jobs")).status_code == 401, "the admin token still closes the server"
        assert (await admin_client.get("/jobs")).status_code == 200
    assert server.stop() == 0

    log = server.log_text()
    assert "unauthorized" in log or " 401" in log, "the log did record the requests"
    stored = b"".join(path.read_bytes() for path in tmp_path.glob("conveyor.db*"))
    assert reader["id"].encode() in stored, "the database file holds the tokens (so the check below means something)"
    for token in (reader["token"], admin["token"]):
        secret = token.rsplit("_", 1)[-1]
        assert secret not in log
        assert secret.encode() not in stored


def test_serve_refuses_a_non_loopback_address_without_tokens(database_url: str) -> None:
    # Safety net: a listener on 127.0.0.1:PORT makes binding 0.0.0.0:PORT fail, so even if the
    # refusal broke, nothing would be exposed beyond loopback.
    with socket.socket() as guard:
        guard.bind(("127.0.0.1", 0))
        guard.listen()
        port = guard.getsockname()[1]
        refused = run_cli(
            database_url,
            "serve",
            "--app",
            "tests.support.tasks:app",
            "--host",
            "0.0.0.0",
            "--port",
            str(port),
            timeout=30,
            extra_env={"COLUMNS": "200"},
        )
    assert refused.returncode == 2, refused.stderr
    assert "refusing to serve on 0.0.0.0 without API tokens" in refused.stderr
    assert "conveyor tokens create" in refused.stderr
    assert "--insecure" in refused.stderr
    assert "Uvicorn running" not in refused.stderr


async def test_an_api_only_server_is_woken_by_a_separate_worker_process(
    start_server: StartServer, tmp_path: Path, database_url: str, effects_path: Path, processes: list[Any]
) -> None:
    server = await start_server("--no-worker")
    async with server.client() as client:
        ready = (await client.get("/ready")).json()
        assert ready == {"status": "ready", "checks": {"database": "ok", "schema": "ok"}}, "no embedded worker"
        jobs = [await submit(client, "effect", args=[n]) for n in range(5)]
        # One call each, held up to the maximum 60 s: only the watcher's wake-up answers them sooner.
        waiting = [asyncio.ensure_future(held_until_finished(client, job["id"])) for job in jobs]
        # The server holds this call for a second: nothing runs the jobs meanwhile, the long-polls wait.
        held = await client.get(f"/jobs/{jobs[0]['id']}", params={"wait": 1}, timeout=10)
        assert held.json()["state"] == "queued"
        assert support.read_effects(effects_path) == []
        assert not any(poll.done() for poll in waiting), "the long-polls are held by the server"

        loop = asyncio.get_running_loop()
        started = loop.time()
        worker = WorkerProcess(tmp_path / "worker.log", database_url, poll_interval_seconds="0.05")
        processes.append(worker)
        finished = await asyncio.wait_for(asyncio.gather(*waiting), timeout=90)
        assert [job["state"] for job in finished] == ["succeeded"] * 5
        # A watcher that never woke them would answer only when the 60 s wait ran out.
        assert loop.time() - started < 40, "the long-polls were woken, not timed out"
        attempts = (await client.get(f"/jobs/{jobs[0]['id']}/attempts")).json()["attempts"]
        assert attempts[0]["worker"].split(":")[1] == str(worker.pid), "the worker process ran it"
    assert worker.stop() == 0
    assert server.stop() == 0
    assert sorted(line.split()[0] for line in support.read_effects(effects_path)) == sorted(job["id"] for job in jobs)


async def test_sigterm_answers_long_polls_and_hands_a_running_job_back_without_burning_its_attempt(
    start_server: StartServer, tmp_path: Path, effects_path: Path, app: Conveyor
) -> None:
    marker = tmp_path / "go"
    server = await start_server(shutdown_grace_seconds="0.5")
    async with server.client() as client:
        job = await submit(client, "until_marker", args=[str(marker)])

        async def running() -> bool:
            return (await client.get(f"/jobs/{job['id']}")).json()["state"] == "running"

        await eventually(running, timeout=30)
        # A client long-polls the job as the server is told to stop: it is answered with the job as
        # it stands, not held until uvicorn's graceful timeout and then cut off.
        polling = asyncio.ensure_future(held_until_finished(client, job["id"]))
        await client.get(f"/jobs/{job['id']}", params={"wait": 0.5})
        assert not polling.done()
        server.process.send_signal(signal.SIGTERM)
        answered = await asyncio.wait_for(polling, timeout=30)
        assert answered["state"] == "running"
    assert await asyncio.to_thread(server.stop) == 0

    handed_back = await app.get_job(job["id"])
    assert (handed_back.state, handed_back.attempt, handed_back.lease_owner) == (JobState.QUEUED, 0, None)
    assert [record.outcome for record in handed_back.history] == [Outcome.RELEASED]
    draining = [event for event in server.events() if event.get("event") == "worker.draining"]
    assert [(event["running"], event["grace_seconds"]) for event in draining] == [(1, 0.5)]

    # Handed back, not lost: any worker takes it again at once, on the same attempt number.
    marker.touch()
    app.task(name="until_marker")(support.until_marker.fn)
    await Worker(app).run(drain=True)
    done = await app.get_job(job["id"])
    assert (done.state, done.attempt, done.result) == (JobState.SUCCEEDED, 1, "marker seen")
    lines = support.read_effects(effects_path)
    assert lines.count(f"done {job['id']} 1") == 1
    assert [line for line in lines if line.startswith("start")] == [f"start {job['id']} 1"] * 2
