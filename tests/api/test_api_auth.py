"""Bearer tokens: open until the first token exists, then every route but /health needs one,
with the scope for what it does; tokens are stored only as hashes."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event
from tests.api.support import Api, add_token, assert_envelope, bearer, serve

from conveyor import Conveyor
from conveyor.api.deps import AuthGate
from conveyor.storage.sql import SqlStore
from conveyor.tokens import Scope

JOB = {"task": "add", "kwargs": {"a": 1, "b": 2}}


async def test_with_no_tokens_at_all_the_api_is_open(idle_api: Api) -> None:
    submitted = await idle_api.client.post("/jobs", json=JOB)
    listed = await idle_api.client.get("/jobs")

    assert submitted.status_code == 202
    assert listed.status_code == 200
    assert submitted.json()["idempotency_key"] is None


async def test_the_first_token_closes_a_running_open_server(idle_api: Api) -> None:
    # A gate that looks every time, instead of within its usual two seconds.
    idle_api.app.state.auth_gate = AuthGate(await idle_api.conveyor.store(), ttl=0)
    assert (await idle_api.client.get("/jobs")).status_code == 200

    _, token = await add_token(idle_api.conveyor, Scope.JOBS_READ)

    assert_envelope(await idle_api.client.get("/jobs"), 401, "unauthorized")
    assert (await idle_api.client.get("/jobs", headers=bearer(token))).status_code == 200


@pytest.mark.parametrize(("method", "path"), [("GET", "/jobs"), ("POST", "/jobs"), ("GET", "/ready")])
async def test_once_a_token_exists_a_request_without_one_is_a_401_with_a_bearer_challenge(
    conveyor: Conveyor, method: str, path: str
) -> None:
    await add_token(conveyor, Scope.ADMIN)
    async with serve(conveyor, run_worker=False) as served:
        response = await served.client.request(method, path, json=JOB if method == "POST" else None)

    assert_envelope(response, 401, "unauthorized")
    assert response.headers["www-authenticate"] == "Bearer"


async def test_a_malformed_or_mistyped_token_is_a_401(conveyor: Conveyor) -> None:
    _, token = await add_token(conveyor, Scope.ADMIN)
    token_id, secret = token.removeprefix("cvy_").split("_", 1)
    mistyped_secret = f"cvy_{token_id}_{'A' if secret[0] != 'A' else 'B'}{secret[1:]}"
    unknown_id = f"cvy_{'0' * 12}_{secret}"
    async with serve(conveyor, run_worker=False) as served:
        answers = {
            label: await served.client.get("/jobs", headers={"Authorization": value})
            for label, value in {
                "not a token": "Bearer not-a-token",
                "not bearer": f"Basic {token}",
                "mistyped secret": f"Bearer {mistyped_secret}",
                "unknown id": f"Bearer {unknown_id}",
                "empty": "Bearer ",
            }.items()
        }
        good = await served.client.get("/jobs", headers=bearer(token))

    for label, response in answers.items():
        assert response.status_code == 401, label
        assert_envelope(response, 401, "unauthorized")
        assert response.headers["www-authenticate"] == "Bearer", label
    assert good.status_code == 200


async def test_a_token_without_the_needed_scope_is_a_403(conveyor: Conveyor) -> None:
    _, reader = await add_token(conveyor, Scope.JOBS_READ)
    _, writer = await add_token(conveyor, Scope.JOBS_WRITE)
    async with serve(conveyor, run_worker=False) as served:
        read_ok = await served.client.get("/jobs", headers=bearer(reader))
        read_submits = await served.client.post("/jobs", json=JOB, headers=bearer(reader))
        write_ok = await served.client.post("/jobs", json=JOB, headers=bearer(writer))
        job_id = write_ok.json()["id"]
        read_cancels = await served.client.post(f"/jobs/{job_id}/cancel", headers=bearer(reader))
        write_reads = await served.client.get(f"/jobs/{job_id}", headers=bearer(writer))
        write_lists_queues = await served.client.get("/queues", headers=bearer(writer))

    assert read_ok.status_code == 200
    assert write_ok.status_code == 202
    error = assert_envelope(read_submits, 403, "forbidden")
    assert error["details"] == {"needed": "jobs:write"}
    assert assert_envelope(read_cancels, 403, "forbidden")["details"] == {"needed": "jobs:write"}
    assert assert_envelope(write_reads, 403, "forbidden")["details"] == {"needed": "jobs:read"}
    assert assert_envelope(write_lists_queues, 403, "forbidden")["details"] == {"needed": "jobs:read"}


async def test_an_admin_token_can_do_everything(conveyor: Conveyor) -> None:
    _, admin = await add_token(conveyor, Scope.ADMIN)
    async with serve(conveyor, run_worker=False) as served:
        client, auth = served.client, bearer(admin)
        submitted = await client.post("/jobs", json=JOB, headers=auth)
        job_id = submitted.json()["id"]
        statuses = {
            "submit": submitted.status_code,
            "batch": (await client.post("/jobs/batch", json={"jobs": [JOB]}, headers=auth)).status_code,
            "get": (await client.get(f"/jobs/{job_id}", headers=auth)).status_code,
            "list": (await client.get("/jobs", headers=auth)).status_code,
            "attempts": (await client.get(f"/jobs/{job_id}/attempts", headers=auth)).status_code,
            "cancel": (await client.post(f"/jobs/{job_id}/cancel", headers=auth)).status_code,
            "retry": (await client.post(f"/jobs/{job_id}/retry", headers=auth)).status_code,
            "queues": (await client.get("/queues", headers=auth)).status_code,
            "tasks": (await client.get("/tasks", headers=auth)).status_code,
            "ready": (await client.get("/ready", headers=auth)).status_code,
        }

    assert statuses == {
        "submit": 202,
        "batch": 200,
        "get": 200,
        "list": 200,
        "attempts": 200,
        "cancel": 200,
        "retry": 200,
        "queues": 200,
        "tasks": 200,
        "ready": 200,
    }


async def test_a_revoked_token_is_a_401_while_others_still_work(conveyor: Conveyor) -> None:
    revoked_id, revoked = await add_token(conveyor, Scope.ADMIN, name="leaked")
    _, kept = await add_token(conveyor, Scope.ADMIN, name="kept")
    async with serve(conveyor, run_worker=False) as served:
        before = await served.client.get("/jobs", headers=bearer(revoked))
        store = await conveyor.store()
        assert await store.revoke_token(revoked_id, now=datetime.now(UTC))
        after = await served.client.get("/jobs", headers=bearer(revoked))
        other = await served.client.get("/jobs", headers=bearer(kept))

    assert before.status_code == 200
    assert_envelope(after, 401, "unauthorized")
    assert other.status_code == 200


async def test_health_answers_whatever_credentials_come_with_it(conveyor: Conveyor) -> None:
    await add_token(conveyor, Scope.ADMIN)
    async with serve(conveyor, run_worker=False) as served:
        response = await served.client.get("/health", headers={"Authorization": "Bearer revoked-or-garbage"})

    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_only_the_hash_of_a_token_is_stored_never_the_token(conveyor: Conveyor, tmp_path: Path) -> None:
    token_id, token = await add_token(conveyor, Scope.ADMIN)
    record = await (await conveyor.store()).get_token(token_id)
    assert record is not None
    async with serve(conveyor, headers=bearer(token)) as served:
        used = await served.client.post("/jobs", json=JOB, headers={"Idempotency-Key": "k"})
        assert used.status_code == 202
        await served.wait(used.json()["id"])

    database = b"".join(path.read_bytes() for path in sorted(tmp_path.glob("conveyor.db*")))
    secret = token.split("_", 2)[2]
    assert record.secret_hash.encode() in database, "the files read are the ones the token went to"
    assert token.encode() not in database
    assert secret.encode() not in database


async def test_revoking_the_only_token_does_not_reopen_the_server(conveyor: Conveyor) -> None:
    token_id, token = await add_token(conveyor, Scope.ADMIN)
    async with serve(conveyor, run_worker=False) as served:
        served.app.state.auth_gate = AuthGate(await conveyor.store(), ttl=0)
        assert (await served.client.get("/jobs", headers=bearer(token))).status_code == 200
        assert await (await conveyor.store()).revoke_token(token_id, now=datetime.now(UTC))

        anonymous = await served.client.get("/jobs")
        revoked = await served.client.get("/jobs", headers=bearer(token))

    assert_envelope(anonymous, 401, "unauthorized")
    assert_envelope(revoked, 401, "unauthorized")


async def test_requests_that_find_the_gate_stale_together_share_one_look_at_the_tokens(idle_api: Api) -> None:
    store = await idle_api.conveyor.store()
    assert isinstance(store, SqlStore)
    engine = store.engine.sync_engine
    idle_api.app.state.auth_gate = AuthGate(store, ttl=60)  # stale until its first look, then fresh
    counts: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if "count(" in statement.lower() and "conveyor_tokens" in statement:
            counts.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    try:
        answers = await asyncio.gather(*(idle_api.client.get("/jobs") for _ in range(10)))
    finally:
        event.remove(engine, "before_cursor_execute", count)

    assert [answer.status_code for answer in answers] == [200] * 10
    assert len(counts) == 1, counts
