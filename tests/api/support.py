"""Helpers for the API tests: the test tasks, a served app with its client, tokens, envelopes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
from fastapi import FastAPI

from conveyor import Conveyor
from conveyor.api.app import create_app
from conveyor.api.schemas import ErrorEnvelope
from conveyor.tokens import Scope, create_token


def crunch(n: int) -> int:
    """A CPU task (module level, as cpu=True requires); the API tests only list it."""
    return n * n


class FakeClock:
    """A clock for ``Conveyor.clock`` that stands still until a test moves it."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now


@dataclass
class Controls:
    """Levers the test tasks obey: ``blocked`` jobs hold until ``release``; ``flaky`` fails while told to."""

    started: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    flaky_fails: bool = True


def register_tasks(conveyor: Conveyor, controls: Controls) -> None:
    @conveyor.task
    async def add(a: int, b: int) -> int:
        return a + b

    @conveyor.task
    async def total(values: list[int]) -> int:
        return sum(values)

    @conveyor.task(queue="emails")
    def shout(text: str) -> str:
        return text.upper()

    conveyor.task(name="crunch", cpu=True)(crunch)

    @conveyor.task(max_attempts=1)
    async def flaky() -> str:
        if controls.flaky_fails:
            raise RuntimeError("flaky failed, as told")
        return "recovered"

    @conveyor.task
    async def blocked() -> str:
        controls.started.set()
        await controls.release.wait()
        return "done"


@dataclass
class Api:
    """One served app: its Conveyor, the FastAPI app (lifespan running) and a client for it."""

    conveyor: Conveyor
    app: FastAPI
    client: httpx.AsyncClient

    async def submit(self, task: str, **body: Any) -> dict[str, Any]:
        response = await self.client.post("/jobs", json={"task": task, **body})
        assert response.status_code == 202, response.text
        return response.json()

    async def wait(self, job_id: str, seconds: float = 10) -> dict[str, Any]:
        """The job once finished (a long poll), failing the test if it did not finish in time."""
        response = await self.client.get(f"/jobs/{job_id}", params={"wait": seconds})
        assert response.status_code == 200, response.text
        job = response.json()
        assert job["state"] in {"succeeded", "dead", "cancelled"}, f"job did not finish within {seconds}s: {job}"
        return job

    async def job_ids(self, **params: Any) -> list[str]:
        response = await self.client.get("/jobs", params={"limit": 500, **params})
        assert response.status_code == 200, response.text
        assert response.json()["next_cursor"] is None
        return [job["id"] for job in response.json()["jobs"]]


@contextlib.asynccontextmanager
async def serve(
    conveyor: Conveyor, *, run_worker: bool = True, headers: dict[str, str] | None = None
) -> AsyncGenerator[Api]:
    """Serve ``conveyor`` in-process, lifespan running, to a client sending ``headers`` by default."""
    app = create_app(conveyor, run_worker=run_worker)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    client = httpx.AsyncClient(transport=transport, base_url="http://test", headers=headers)
    async with app.router.lifespan_context(app), client:
        yield Api(conveyor, app, client)


async def add_token(conveyor: Conveyor, *scopes: Scope, name: str = "test") -> tuple[str, str]:
    """Store a new token; return its id and its plaintext (which only the caller ever sees)."""
    new = create_token(name, scopes, now=datetime.now(UTC))
    await (await conveyor.store()).insert_token(new.record)
    return new.record.id, new.plaintext


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_envelope(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The response is the one error envelope, with this status and code; returns its ``error``."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    ErrorEnvelope.model_validate(body)  # exactly the documented shape, nothing more
    error = body["error"]
    assert set(error) == {"code", "message", "details", "correlation_id"}
    assert error["code"] == code, error
    assert error["message"]
    assert error["correlation_id"] == response.headers["x-correlation-id"]
    return error
