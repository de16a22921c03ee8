"""One error envelope for every failure, and correlation ids from request to job."""

from __future__ import annotations

import random
import re
from collections.abc import AsyncIterator, Callable

import pytest
from tests.api.support import Api, assert_envelope, serve

from conveyor import Conveyor


@pytest.fixture
async def small_api(make_conveyor: Callable[..., Conveyor]) -> AsyncIterator[Api]:
    """An API that refuses request bodies over 2 KiB."""
    async with serve(make_conveyor(max_request_bytes=2048), run_worker=False) as served:
        yield served


async def test_an_unknown_route_is_a_404_envelope(idle_api: Api) -> None:
    response = await idle_api.client.get("/no/such/route")

    assert_envelope(response, 404, "not_found")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/jobs/{id}"),
        ("GET", "/jobs/{id}/attempts"),
        ("POST", "/jobs/{id}/cancel"),
        ("POST", "/jobs/{id}/retry"),
    ],
)
async def test_an_unknown_job_id_is_a_404_envelope_naming_it(idle_api: Api, method: str, path: str) -> None:
    response = await idle_api.client.request(method, path.format(id="no-such-job"))

    error = assert_envelope(response, 404, "job_not_found")
    assert error["details"] == {"job_id": "no-such-job"}


async def test_a_wrong_method_is_a_405_envelope_saying_what_is_allowed(idle_api: Api) -> None:
    response = await idle_api.client.delete("/jobs/some-id")

    assert_envelope(response, 405, "method_not_allowed")
    assert response.headers["allow"] == "GET"


async def test_a_body_over_the_limit_by_content_length_is_a_413_envelope(small_api: Api) -> None:
    too_big = await small_api.client.post("/jobs", json={"task": "shout", "kwargs": {"text": "x" * 3000}})
    fits = await small_api.client.post("/jobs", json={"task": "shout", "kwargs": {"text": "x" * 1500}})

    assert int(too_big.request.headers["content-length"]) > 2048
    error = assert_envelope(too_big, 413, "payload_too_large")
    assert "2048" in error["message"]
    assert fits.status_code == 202, "a body under the limit is read as usual"
    assert await small_api.job_ids() == [fits.json()["id"]], "nothing of the refused body was stored"


async def test_a_streamed_body_over_the_limit_is_a_413_envelope_without_content_length(small_api: Api) -> None:
    sent: list[int] = []

    async def chunks(count: int) -> AsyncIterator[bytes]:
        yield b'{"task": "shout", "kwargs": {"text": "'
        for _ in range(count):
            sent.append(1)
            yield b"x" * 500
        yield b'"}}'

    too_big = await small_api.client.post("/jobs", content=chunks(10), headers={"content-type": "application/json"})
    fits = await small_api.client.post("/jobs", content=chunks(2), headers={"content-type": "application/json"})

    assert "content-length" not in too_big.request.headers
    assert too_big.request.headers["transfer-encoding"] == "chunked"
    assert_envelope(too_big, 413, "payload_too_large")
    assert fits.status_code == 202, "a streamed body under the limit is read as usual"
    assert await small_api.job_ids() == [fits.json()["id"]], "nothing of the refused body was stored"


async def test_request_validation_lists_every_invalid_field_at_once(idle_api: Api) -> None:
    response = await idle_api.client.post(
        "/jobs", json={"task": "", "priority": "high", "surprise": True, "kwargs": {"a": 1, "b": 2}}
    )

    error = assert_envelope(response, 422, "validation_error")
    problems = {tuple(problem["loc"]): problem for problem in error["details"]}
    assert set(problems) == {("body", "task"), ("body", "priority"), ("body", "surprise")}
    assert problems[("body", "surprise")]["type"] == "extra_forbidden"
    assert all(problem["message"] for problem in problems.values())
    assert "3" in error["message"]
    assert await idle_api.job_ids() == []


async def test_an_unknown_task_is_a_422_envelope_naming_it(idle_api: Api) -> None:
    response = await idle_api.client.post("/jobs", json={"task": "no_such_task"})

    error = assert_envelope(response, 422, "unknown_task")
    assert error["details"] == {"task": "no_such_task"}
    assert "add" in error["message"], "the message names the registered tasks"
    assert await idle_api.job_ids() == []


async def test_bad_task_arguments_are_a_422_envelope_listing_each_problem(idle_api: Api) -> None:
    response = await idle_api.client.post("/jobs", json={"task": "add", "kwargs": {"a": "one", "b": "two"}})

    error = assert_envelope(response, 422, "invalid_job")
    assert [problem.split(":")[0] for problem in error["details"]] == ["a", "b"]
    assert all("integer" in problem for problem in error["details"])
    assert await idle_api.job_ids() == []


async def test_an_unexpected_error_is_a_500_envelope_with_the_correlation_id_and_nothing_internal(
    idle_api: Api,
) -> None:
    async def explode() -> None:
        raise RuntimeError("connection to db-primary.internal:5432 failed for password hunter2")

    idle_api.app.add_api_route("/explode", explode)

    response = await idle_api.client.get("/explode", headers={"X-Correlation-ID": "incident-500"})

    error = assert_envelope(response, 500, "internal_error")
    assert error["correlation_id"] == "incident-500"
    assert "correlation id" in error["message"]
    assert error["details"] is None
    for internal in ("hunter2", "db-primary", "RuntimeError", "Traceback", "explode"):
        assert internal not in response.text


async def test_made_correlation_ids_differ_and_leave_the_process_wide_random_state_alone(idle_api: Api) -> None:
    random.seed(7731)  # as an application seeding its own draws would
    state = random.getstate()

    made = [(await idle_api.client.get("/health")).headers["x-correlation-id"] for _ in range(3)]

    assert random.getstate() == state
    assert len(set(made)) == 3
    assert all(len(given) == 32 for given in made)


@pytest.mark.parametrize("given", ["has spaces", "x" * 129, "semi;colon", "quote'd"])
async def test_an_invalid_correlation_id_is_a_400_envelope(idle_api: Api, given: str) -> None:
    response = await idle_api.client.get("/health", headers={"X-Correlation-ID": given})

    assert response.status_code == 400
    assert response.json() == {
        "error": {
            "code": "invalid_correlation_id",
            "message": "X-Correlation-ID must be 1 to 128 characters of letters, digits and ._:@/+=-",
            "details": None,
            "correlation_id": None,
        }
    }
    assert "x-correlation-id" not in response.headers, "an invalid id is not echoed"


async def test_a_valid_correlation_id_is_echoed_and_stored_on_the_job(api: Api) -> None:
    given = "order-42:web@eu/1+2=3." + "z" * 106
    assert len(given) == 128

    response = await api.client.post(
        "/jobs", json={"task": "add", "kwargs": {"a": 1, "b": 2}}, headers={"X-Correlation-ID": given}
    )

    assert response.status_code == 202
    assert response.headers["x-correlation-id"] == given
    assert response.json()["correlation_id"] == given
    finished = await api.wait(response.json()["id"])
    assert finished["correlation_id"] == given, "kept through the run"


async def test_without_a_correlation_id_one_is_generated_echoed_and_stored(idle_api: Api) -> None:
    first = await idle_api.client.post("/jobs", json={"task": "add", "kwargs": {"a": 1, "b": 2}})
    second = await idle_api.client.post("/jobs", json={"task": "add", "kwargs": {"a": 1, "b": 2}})

    generated = first.headers["x-correlation-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    assert first.json()["correlation_id"] == generated
    stored = await idle_api.client.get(f"/jobs/{first.json()['id']}")
    assert stored.json()["correlation_id"] == generated
    assert second.headers["x-correlation-id"] != generated, "one per request"
