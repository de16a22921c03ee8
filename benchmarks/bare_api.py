"""The floor for W4: a bare FastAPI app with the same routes' shape and the same server settings.

uvicorn benchmarks.bare_api:app
"""

from __future__ import annotations

import gc
import uuid
from typing import Any

from fastapi import FastAPI, status
from pydantic import BaseModel, ConfigDict, Field

app = FastAPI()


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    task: str = Field(min_length=1, max_length=255)
    args: list[Any] = Field(default_factory=list)
    kwargs: dict[str, Any] = Field(default_factory=dict)


class JobPublic(BaseModel):
    id: str
    task: str
    state: str
    args: list[Any]
    kwargs: dict[str, Any]


@app.post("/jobs", status_code=status.HTTP_202_ACCEPTED, response_model=JobPublic)
async def create_job(body: JobCreate) -> JobPublic:
    return JobPublic(id=str(uuid.uuid4()), task=body.task, state="queued", args=body.args, kwargs=body.kwargs)


@app.get("/jobs/{job_id}", response_model=JobPublic)
async def get_job(job_id: str) -> JobPublic:
    return JobPublic(id=job_id, task="noop", state="succeeded", args=[], kwargs={})


# The same collector settings `conveyor serve` applies once started (conveyor.cli.settle_heap),
# so the ratio measures Conveyor's own work, not a difference in garbage collection.
gc.collect()
gc.freeze()
gc.set_threshold(10_000, *gc.get_threshold()[1:])
