"""Idempotency-Key: a repeat returns the first job; a key is the caller's own."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.api.support import Api, add_token, assert_envelope, bearer, serve

from conveyor import Conveyor
from conveyor.api.schemas import BatchResult
from conveyor.tokens import Scope

BODY = {"task": "add", "kwargs": {"a": 1, "b": 2}}


def _keyed(key: str, token: str | None = None) -> dict[str, str]:
    return {"Idempotency-Key": key, **(bearer(token) if token else {})}


async def test_a_repeat_with_the_same_key_and_body_replays_the_first_job(idle_api: Api) -> None:
    first = await idle_api.client.post("/jobs", json=BODY, headers=_keyed("order-1"))
    again = await idle_api.client.post("/jobs", json=BODY, headers=_keyed("order-1"))

    assert first.status_code == 202
    assert "idempotent-replayed" not in first.headers
    assert again.status_code == 200
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()
    assert again.headers["location"] == first.headers["location"]
    assert first.json()["idempotency_key"] == "order-1", "the caller's key, without its scope"
    assert await idle_api.job_ids() == [first.json()["id"]]


async def test_the_same_key_with_a_different_body_is_a_422_and_stores_nothing(idle_api: Api) -> None:
    first = await idle_api.client.post("/jobs", json=BODY, headers=_keyed("order-1"))

    changed = await idle_api.client.post("/jobs", json={**BODY, "priority": 5}, headers=_keyed("order-1"))

    error = assert_envelope(changed, 422, "idempotency_key_reused")
    assert error["details"] == {"job_id": first.json()["id"]}
    assert await idle_api.job_ids() == [first.json()["id"]]


async def test_keys_are_scoped_to_the_calling_token(conveyor: Conveyor) -> None:
    _, alice = await add_token(conveyor, Scope.JOBS_WRITE, Scope.JOBS_READ, name="alice")
    _, bob = await add_token(conveyor, Scope.JOBS_WRITE, Scope.JOBS_READ, name="bob")
    async with serve(conveyor, run_worker=False) as served:
        by_alice = await served.client.post("/jobs", json=BODY, headers=_keyed("shared", alice))
        by_bob = await served.client.post("/jobs", json=BODY, headers=_keyed("shared", bob))
        alice_again = await served.client.post("/jobs", json=BODY, headers=_keyed("shared", alice))
        listed = await served.client.get("/jobs", headers=bearer(alice))

    assert (by_alice.status_code, by_bob.status_code) == (202, 202), "bob's key is not alice's"
    assert by_alice.json()["id"] != by_bob.json()["id"]
    assert by_alice.json()["idempotency_key"] == by_bob.json()["idempotency_key"] == "shared"
    assert alice_again.status_code == 200
    assert alice_again.json()["id"] == by_alice.json()["id"]
    assert len(listed.json()["jobs"]) == 2


async def test_concurrent_identical_requests_create_exactly_one_job(idle_api: Api) -> None:
    responses = await asyncio.gather(
        *(idle_api.client.post("/jobs", json=BODY, headers=_keyed("burst")) for _ in range(20))
    )

    assert sorted(response.status_code for response in responses) == [200] * 19 + [202]
    assert len({response.json()["id"] for response in responses}) == 1
    assert await idle_api.job_ids() == [responses[0].json()["id"]]


async def test_batch_items_with_keys_are_replayed_and_checked_like_single_submissions(idle_api: Api) -> None:
    items: list[dict[str, Any]] = [
        {**BODY, "idempotency_key": "item-a"},
        {**BODY, "idempotency_key": "item-b"},
        BODY,
    ]
    first = BatchResult.model_validate((await idle_api.client.post("/jobs/batch", json={"jobs": items})).json())
    items[1] = {**items[1], "priority": 9}
    again = BatchResult.model_validate((await idle_api.client.post("/jobs/batch", json={"jobs": items})).json())

    assert [result.status for result in first.results] == ["created", "created", "created"]
    assert [result.status for result in again.results] == ["replayed", "error", "created"]
    replayed, reused = again.results[0], again.results[1]
    assert replayed.job is not None
    assert first.results[0].job is not None
    assert replayed.job.id == first.results[0].job.id
    assert reused.error is not None
    assert first.results[1].job is not None
    assert (reused.error.code, reused.error.details) == ("idempotency_key_reused", {"job_id": first.results[1].job.id})
    assert len(await idle_api.job_ids()) == 4, "two keyed jobs, and the unkeyed one twice"


async def test_a_batch_idempotency_header_keys_each_item_by_its_position(idle_api: Api) -> None:
    body = {"jobs": [BODY, {"task": "shout", "kwargs": {"text": "hi"}}]}

    first = await idle_api.client.post("/jobs/batch", json=body, headers=_keyed("batch-7"))
    again = await idle_api.client.post("/jobs/batch", json=body, headers=_keyed("batch-7"))

    assert [result["status"] for result in first.json()["results"]] == ["created", "created"]
    assert [result["status"] for result in again.json()["results"]] == ["replayed", "replayed"]
    assert [result["job"]["id"] for result in again.json()["results"]] == [
        result["job"]["id"] for result in first.json()["results"]
    ]
    assert [result["job"]["idempotency_key"] for result in first.json()["results"]] == ["batch-7/0", "batch-7/1"]
    assert len(await idle_api.job_ids()) == 2
