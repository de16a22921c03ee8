"""Routes answered without FastAPI's generic handler: they answer as FastAPI would, and hand over
every request they do not take."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI, Header, Request, Response
from tests.api.support import Api, add_token, assert_envelope, bearer, serve

from conveyor import Conveyor
from conveyor.api.direct import DirectRoute, answered_directly
from conveyor.api.routes import jobs
from conveyor.tokens import Scope

# FastAPI parses a `+json` body as JSON too; the direct handler takes only application/json, so
# this content type sends the same request down FastAPI's own path.
VIA_FASTAPI = {"content-type": "application/vnd.conveyor+json"}
TIMES = ("created_at", "updated_at", "run_at")


def _without(job: dict[str, Any], *fields: str) -> dict[str, Any]:
    return {name: value for name, value in job.items() if name not in fields}


async def test_reading_a_job_answers_byte_for_byte_what_fastapi_answers(api: Api) -> None:
    finished = await api.submit("add", kwargs={"a": 2, "b": 3}, priority=4)
    await api.wait(finished["id"])
    # Scheduled an hour out: it stays as it is between the two reads.
    scheduled = await api.submit("shout", kwargs={"text": "later"}, delay_seconds=3600, timeout_seconds=9.5)

    for job_id in (finished["id"], scheduled["id"]):
        direct = await api.client.get(f"/jobs/{job_id}")
        # Any query string goes to FastAPI; a zero wait answers at once, as a plain read does.
        standard = await api.client.get(f"/jobs/{job_id}", params={"wait": 0})
        assert (direct.status_code, standard.status_code) == (200, 200)
        assert direct.headers["content-type"] == standard.headers["content-type"] == "application/json"
        assert direct.content == standard.content


async def test_submitting_a_job_answers_as_fastapi_does(idle_api: Api) -> None:
    body = {"task": "shout", "kwargs": {"text": "hi"}, "priority": 3, "max_attempts": 2, "unique_key": None}
    same = {"X-Correlation-ID": "checkout-42"}
    direct = await idle_api.client.post("/jobs", json=body, headers=same)
    standard = await idle_api.client.post("/jobs", json=body, headers={**same, **VIA_FASTAPI})

    assert (direct.status_code, standard.status_code) == (202, 202)
    assert direct.headers["content-type"] == standard.headers["content-type"] == "application/json"
    for response in (direct, standard):
        assert response.headers["location"] == f"http://test/jobs/{response.json()['id']}"
    assert direct.json().keys() == standard.json().keys()
    assert _without(direct.json(), "id", *TIMES) == _without(standard.json(), "id", *TIMES)
    assert direct.json()["state"] == "queued"


async def test_a_replayed_submission_answers_byte_for_byte_what_fastapi_answers(idle_api: Api) -> None:
    key = {"Idempotency-Key": "order-7"}
    first = await idle_api.client.post("/jobs", json={"task": "add", "args": [1, 2]}, headers=key)
    direct = await idle_api.client.post("/jobs", json={"task": "add", "args": [1, 2]}, headers=key)
    standard = await idle_api.client.post("/jobs", json={"task": "add", "args": [1, 2]}, headers={**key, **VIA_FASTAPI})

    assert (first.status_code, direct.status_code, standard.status_code) == (202, 200, 200)
    assert direct.headers["idempotent-replayed"] == standard.headers["idempotent-replayed"] == "true"
    assert direct.headers["location"] == standard.headers["location"]
    assert direct.content == standard.content
    assert direct.json()["id"] == first.json()["id"]


@pytest.mark.parametrize(
    ("body", "headers", "status", "code"),
    [
        ({"task": "add", "priority": "high"}, {}, 422, "validation_error"),
        ({"task": "add", "surprise": 1}, {}, 422, "validation_error"),
        ({"task": "add"}, {"Idempotency-Key": ""}, 422, "validation_error"),
        ({"task": "add"}, {"Idempotency-Key": "k" * 201}, 422, "validation_error"),
        ({"task": "no-such-task"}, {}, 422, "unknown_task"),
        ({"task": "add", "kwargs": {"a": 1}}, {}, 422, "invalid_job"),
    ],
)
async def test_a_submission_either_path_refuses_gets_the_same_envelope(
    idle_api: Api, body: dict[str, Any], headers: dict[str, str], status: int, code: str
) -> None:
    direct = await idle_api.client.post("/jobs", json=body, headers=headers)
    standard = await idle_api.client.post("/jobs", json=body, headers={**headers, **VIA_FASTAPI})

    errors = [assert_envelope(response, status, code) for response in (direct, standard)]
    assert _without(errors[0], "correlation_id") == _without(errors[1], "correlation_id")
    assert await idle_api.job_ids() == []


async def test_a_body_that_is_not_json_gets_fastapis_validation_envelope(idle_api: Api) -> None:
    response = await idle_api.client.post(
        "/jobs", content=b'{"task": "add",', headers={"content-type": "application/json"}
    )

    assert_envelope(response, 422, "validation_error")
    assert await idle_api.job_ids() == []


@pytest.fixture
async def guarded(make_conveyor: Callable[..., Conveyor]) -> AsyncIterator[tuple[Api, str, str]]:
    """A served app with tokens: one that may only read jobs, one that may only write them."""
    conveyor = make_conveyor()
    _, reader = await add_token(conveyor, Scope.JOBS_READ, name="reader")
    _, writer = await add_token(conveyor, Scope.JOBS_WRITE, name="writer")
    async with serve(conveyor, run_worker=False) as served:
        yield served, reader, writer


async def test_either_path_checks_the_token_and_its_scope_the_same_way(guarded: tuple[Api, str, str]) -> None:
    api, reader, writer = guarded
    for extra in ({}, VIA_FASTAPI):
        assert_envelope(await api.client.post("/jobs", json={"task": "add"}, headers=extra), 401, "unauthorized")
        refused = await api.client.post("/jobs", json={"task": "add"}, headers={**bearer(reader), **extra})
        assert_envelope(refused, 403, "forbidden")
        # A bad body does not tell an unauthenticated caller anything: the token is checked first.
        assert_envelope(await api.client.post("/jobs", json={"task": 5}, headers=extra), 401, "unauthorized")
    submitted = await api.client.post("/jobs", json={"task": "add", "args": [1, 2]}, headers=bearer(writer))
    assert submitted.status_code == 202
    path = f"/jobs/{submitted.json()['id']}"
    for params in ({}, {"wait": 0}):
        assert_envelope(await api.client.get(path, params=params), 401, "unauthorized")
        assert_envelope(await api.client.get(path, params=params, headers=bearer(writer)), 403, "forbidden")
        assert (await api.client.get(path, params=params, headers=bearer(reader))).status_code == 200


async def test_an_unknown_job_is_the_same_404_either_way(idle_api: Api) -> None:
    direct = await idle_api.client.get("/jobs/nope")
    standard = await idle_api.client.get("/jobs/nope", params={"wait": 0})

    errors = [assert_envelope(response, 404, "job_not_found") for response in (direct, standard)]
    assert _without(errors[0], "correlation_id") == _without(errors[1], "correlation_id")


# -- the mechanism, on an app of its own ------------------------------------------------------


def _header_dependency(x_path: Annotated[str | None, Header()] = None) -> str | None:
    return x_path


def _app(answered: list[str]) -> FastAPI:
    router = APIRouter(route_class=DirectRoute)

    async def quick(request: Request) -> Response | None:
        if request.headers.get("x-path") != "direct":
            return None
        answered.append("direct")
        return Response(b'{"by": "direct"}', media_type="application/json")

    @router.get("/echo")
    @answered_directly(quick)
    async def echo(x_path: Annotated[str | None, Depends(_header_dependency)]) -> dict[str, Any]:
        answered.append("fastapi")
        return {"by": "fastapi", "asked": x_path}

    @router.get("/plain")
    async def plain() -> dict[str, str]:
        answered.append("fastapi")
        return {"by": "fastapi"}

    # Attached after the route is declared: still used.
    answered_directly(quick)(plain)
    app = FastAPI()
    app.include_router(router)
    return app


async def test_a_direct_route_answers_directly_or_hands_the_request_to_fastapi() -> None:
    answered: list[str] = []
    transport = httpx.ASGITransport(app=_app(answered))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        direct = await client.get("/echo", headers={"x-path": "direct"})
        standard = await client.get("/echo", headers={"x-path": "other"})
        late = await client.get("/plain", headers={"x-path": "direct"})

    assert direct.json() == {"by": "direct"}
    assert standard.json() == {"by": "fastapi", "asked": "other"}
    assert late.json() == {"by": "direct"}
    assert answered == ["direct", "fastapi", "direct"], "each request is answered once, by one path"


async def test_with_dependency_overrides_every_request_goes_through_fastapi() -> None:
    answered: list[str] = []
    app = _app(answered)

    def overridden() -> str:
        return "overridden"

    app.dependency_overrides[_header_dependency] = overridden
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get("/echo", headers={"x-path": "direct"})

    assert response.json() == {"by": "fastapi", "asked": "overridden"}
    assert answered == ["fastapi"]


def test_submitting_and_reading_a_job_have_direct_handlers() -> None:
    # What the tests above compare: with no direct handler, both sides would be FastAPI's.
    handled = {
        (route.path, method)
        for route in jobs.router.routes
        if isinstance(route, DirectRoute) and getattr(route.endpoint, "__conveyor_direct__", None) is not None
        for method in route.methods or ()
    }
    assert {("/jobs", "POST"), ("/jobs/{job_id}", "GET")} <= handled
