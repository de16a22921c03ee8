"""Jobs: submit, look up, long-poll, list, cancel, retry, and each job's attempts."""

from __future__ import annotations

import dataclasses
import hashlib
from datetime import datetime
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Header, Query, Request, Response, status
from pydantic import ValidationError

from conveyor.api.deps import (
    CanRead,
    CanWrite,
    ConveyorDep,
    Principal,
    can_read,
    can_write,
    conveyor_of,
    watcher_of,
)
from conveyor.api.direct import DirectRoute, answered_directly
from conveyor.api.errors import ERROR_RESPONSES, ApiError
from conveyor.api.schemas import (
    AttemptPublic,
    AttemptsPublic,
    BatchCreate,
    BatchItemResult,
    BatchResult,
    ErrorBody,
    ErrorEnvelope,
    JobCreate,
    JobPublic,
    JobsPublic,
)
from conveyor.app import Conveyor
from conveyor.correlation import current_correlation_id
from conveyor.errors import TaskArgumentsError, UnknownTaskError
from conveyor.jobs import Job, JobState, NewJob
from conveyor.tasks import EnqueueOptions

router = APIRouter(prefix="/jobs", tags=["jobs"], responses=ERROR_RESPONSES, route_class=DirectRoute)

IDEMPOTENCY_KEY_MAX = 200
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=IDEMPOTENCY_KEY_MAX,
        description="Submit once per key: a repeat with the same body returns the first job.",
    ),
]
REPLAYED_HEADER = "Idempotent-Replayed"


def _digest(body: JobCreate) -> str:
    canonical = body.model_dump(mode="json", exclude={"idempotency_key"}, exclude_none=True)
    return hashlib.sha256(orjson.dumps(canonical, option=orjson.OPT_SORT_KEYS)).hexdigest()


def _build(conveyor: Conveyor, body: JobCreate, principal: Principal, key: str | None) -> NewJob:
    task = conveyor.get_task(body.task)
    options = EnqueueOptions(
        queue=body.queue,
        priority=body.priority,
        delay=body.delay_seconds,
        run_at=body.run_at,
        max_attempts=body.max_attempts,
        timeout=body.timeout_seconds,
        unique_key=body.unique_key,
        # Keys are scoped to the caller, so two clients never collide on the same key.
        idempotency_key=f"{principal.id}:{key}" if key else None,
        correlation_id=current_correlation_id(),
    )
    new = conveyor.new_job(task, body.args, body.kwargs, options)
    if key is None:
        return new
    return dataclasses.replace(new, request_digest=_digest(body))


def _replayed(new: NewJob, stored: Job) -> bool:
    """True for a repeat of an earlier request; raises if the key came with a different body."""
    if stored.id == new.id:
        return False
    if stored.request_digest != new.request_digest:
        raise ApiError(
            422,
            "idempotency_key_reused",
            "this Idempotency-Key was already used with a different request body",
            {"job_id": stored.id},
        )
    return True


async def _submit(
    request: Request, body: JobCreate, principal: Principal, key: str | None
) -> tuple[JobPublic, int, dict[str, str]]:
    """Store a submitted job: the job as stored, the status to answer with and the extra headers."""
    conveyor = conveyor_of(request)
    new = _build(conveyor, body, principal, key)
    # Concurrent submissions share one transaction (and one commit's fsync): see _GroupCommit.
    stored = await conveyor.enqueue_new(new)
    headers = {"Location": _job_url(request, stored.id)}
    status_code = status.HTTP_202_ACCEPTED
    if _replayed(new, stored):
        headers[REPLAYED_HEADER] = "true"
        status_code = status.HTTP_200_OK
    return JobPublic.of(stored), status_code, headers


def _json(model: JobPublic, status_code: int = status.HTTP_200_OK, headers: dict[str, str] | None = None) -> Response:
    # The response model's own serializer: the bytes FastAPI would send for it.
    return Response(model.__pydantic_serializer__.to_json(model), status_code, headers, "application/json")


async def _create_job_directly(request: Request) -> Response | None:
    """``POST /jobs`` for a well-formed request (see conveyor.api.direct); None hands it to FastAPI."""
    headers = request.headers
    content_type = headers.get("content-type", "")
    key = headers.get("idempotency-key")
    if content_type != "application/json" and not content_type.startswith("application/json;"):
        return None
    if key is not None and not 0 < len(key) <= IDEMPOTENCY_KEY_MAX:
        return None
    try:
        # Parsed as FastAPI does (JSON to Python, then the model in Python mode), so the direct
        # path accepts exactly what the standard one would.
        body = JobCreate.model_validate(orjson.loads(await request.body()))
    except (orjson.JSONDecodeError, ValidationError):
        return None
    principal = await can_write(request)
    job, status_code, extra_headers = await _submit(request, body, principal, key)
    return _json(job, status_code, extra_headers)


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobPublic,
    responses={200: {"model": JobPublic, "description": "A replay of an earlier request with the same key"}},
    summary="Submit a job",
)
@answered_directly(_create_job_directly)
async def create_job(
    body: JobCreate,
    request: Request,
    response: Response,
    principal: CanWrite,
    idempotency_key: IdempotencyKey = None,
) -> JobPublic:
    """Store a job and answer at once with its id; poll `GET /jobs/{id}` for the outcome."""
    job, status_code, headers = await _submit(request, body, principal, idempotency_key)
    response.status_code = status_code
    response.headers.update(headers)
    return job


def _job_url(request: Request, job_id: str) -> str:
    """What ``request.url_for("get_job", job_id=...)`` answers, without its search of every route.

    The base (scheme, host, root path) is the same for almost every request: the last one is kept.
    """
    global _last_base  # noqa: PLW0603 - a one-entry cache
    scope = request.scope
    host = next((value for name, value in scope["headers"] if name == b"host"), None)
    key = (scope.get("scheme"), scope.get("server"), scope.get("app_root_path", scope.get("root_path")), host)
    if _last_base is None or _last_base[0] != key:
        _last_base = (key, f"{str(request.base_url).rstrip('/')}{router.prefix}/")
    return _last_base[1] + job_id


_last_base: tuple[tuple[Any, ...], str] | None = None


@router.post("/batch", response_model=BatchResult, summary="Submit many jobs")
async def create_jobs(
    body: BatchCreate,
    conveyor: ConveyorDep,
    principal: CanWrite,
    idempotency_key: IdempotencyKey = None,
) -> BatchResult:
    """Each item succeeds or fails on its own; results come back in the request's order."""
    limit = conveyor.settings.batch_limit
    if len(body.jobs) > limit:
        raise ApiError(413, "batch_too_large", f"a batch holds at most {limit} jobs, not {len(body.jobs)}")
    results: list[BatchItemResult | None] = [None] * len(body.jobs)
    valid: list[tuple[int, NewJob]] = []
    for index, item in enumerate(body.jobs):
        key = item.idempotency_key or (f"{idempotency_key}/{index}" if idempotency_key else None)
        try:
            valid.append((index, _build(conveyor, item, principal, key)))
        except UnknownTaskError as exc:
            results[index] = _item_error(index, "unknown_task", str(exc), {"task": exc.name})
        except TaskArgumentsError as exc:
            results[index] = _item_error(index, "invalid_job", exc.summary, exc.problems)
    stored = await conveyor.enqueue_many([new for _, new in valid])
    for (index, new), job in zip(valid, stored, strict=True):
        try:
            replay = _replayed(new, job)
        except ApiError as exc:
            results[index] = _item_error(index, exc.code, exc.message, exc.details)
            continue
        results[index] = BatchItemResult(index=index, status="replayed" if replay else "created", job=JobPublic.of(job))
    return BatchResult(results=[result for result in results if result is not None])


def _item_error(index: int, code: str, message: str, details: Any) -> BatchItemResult:
    return BatchItemResult(index=index, status="error", error=ErrorBody(code=code, message=message, details=details))


_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": ErrorEnvelope, "description": "No job has this id"}}


async def _get_job_directly(request: Request) -> Response | None:
    """``GET /jobs/{id}`` without waiting (see conveyor.api.direct); None hands it to FastAPI."""
    if request.scope["query_string"]:
        return None
    await can_read(request)
    job = await conveyor_of(request).get_job(request.path_params["job_id"])
    return _json(JobPublic.of(job))


@router.get("/{job_id}", response_model=JobPublic, responses=_NOT_FOUND, summary="Get a job, or wait for it")
@answered_directly(_get_job_directly)
async def get_job(
    job_id: str,
    request: Request,
    _principal: CanRead,
    wait: Annotated[
        float, Query(ge=0, le=60, description="Hold the request up to this many seconds until the job finishes.")
    ] = 0,
) -> JobPublic:
    conveyor = conveyor_of(request)
    job = await conveyor.get_job(job_id)
    if wait > 0 and not job.finished:
        await watcher_of(request).wait(job_id, wait)
        job = await conveyor.get_job(job_id)
    return JobPublic.of(job)


@router.get("", response_model=JobsPublic, summary="List jobs, newest first")
async def list_jobs(
    conveyor: ConveyorDep,
    _principal: CanRead,
    state: Annotated[list[JobState] | None, Query(description="Only these states (repeatable).")] = None,
    queue: Annotated[str | None, Query(max_length=255)] = None,
    task: Annotated[str | None, Query(max_length=255)] = None,
    created_after: Annotated[datetime | None, Query(description="Inclusive, ISO 8601 with a zone.")] = None,
    created_before: Annotated[datetime | None, Query(description="Exclusive, ISO 8601 with a zone.")] = None,
    cursor: Annotated[str | None, Query(max_length=64, description="`next_cursor` of the previous page.")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> JobsPublic:
    for name, value in (("created_after", created_after), ("created_before", created_before)):
        if value is not None and value.tzinfo is None:
            raise ApiError(422, "validation_error", f"{name} needs a time zone, e.g. 2026-01-01T00:00:00Z")
    page = await conveyor.list_jobs(
        states=state or (),
        queue=queue,
        task=task,
        created_after=created_after,
        created_before=created_before,
        cursor=cursor,
        limit=limit,
    )
    return JobsPublic(jobs=[JobPublic.of(job) for job in page.jobs], next_cursor=page.next_cursor)


_CONFLICT: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorEnvelope, "description": "No job has this id"},
    409: {"model": ErrorEnvelope, "description": "The job's state does not allow this"},
}


@router.post(
    "/{job_id}/cancel",
    response_model=JobPublic,
    responses={
        **_CONFLICT,
        202: {"model": JobPublic, "description": "The job is running: its worker was asked to stop it"},
    },
    summary="Cancel a job",
)
async def cancel_job(job_id: str, response: Response, conveyor: ConveyorDep, _principal: CanWrite) -> JobPublic:
    """Cancels a queued, scheduled or retrying job at once (200). A running job is asked to stop
    (202, `cancel_requested_at` set): an async task is interrupted within about a second, a sync
    or CPU task after `CONVEYOR_CANCEL_GRACE_SECONDS`; it then ends `cancelled`. A finished job
    is a conflict (409)."""
    job = await conveyor.cancel_job(job_id)
    if job.state is JobState.RUNNING:
        response.status_code = status.HTTP_202_ACCEPTED
    return JobPublic.of(job)


@router.post("/{job_id}/retry", response_model=JobPublic, responses=_CONFLICT, summary="Retry a dead or cancelled job")
async def retry_job(job_id: str, conveyor: ConveyorDep, _principal: CanWrite) -> JobPublic:
    """Queues the job again with its full number of attempts (a dead-letter replay)."""
    return JobPublic.of(await conveyor.retry_job(job_id))


@router.get("/{job_id}/attempts", response_model=AttemptsPublic, responses=_NOT_FOUND, summary="A job's history")
async def job_attempts(job_id: str, conveyor: ConveyorDep, _principal: CanRead) -> AttemptsPublic:
    job = await conveyor.get_job(job_id)
    attempts = [AttemptPublic.of(record) for record in job.history]
    if job.state is JobState.RUNNING:
        attempts.append(
            AttemptPublic(
                attempt=job.attempt,
                outcome="running",
                worker=job.lease_owner.split("#")[0] if job.lease_owner else None,
                started_at=job.attempted_at,
                ended_at=None,
            )
        )
    return AttemptsPublic(job_id=job.id, attempts=attempts)
