"""One error envelope for every non-2xx answer: ``{"error": {"code", "message", "details"}}``."""

from __future__ import annotations

from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from conveyor.api.correlation import INTERNAL_ERROR_MESSAGE
from conveyor.api.schemas import ErrorEnvelope
from conveyor.correlation import current_correlation_id
from conveyor.errors import (
    JobNotFoundError,
    JobStateError,
    StorageError,
    TaskArgumentsError,
    UnknownTaskError,
    WorkflowNotFoundError,
)

logger = structlog.get_logger("conveyor.api")

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_requests",
    503: "service_unavailable",
}


class ApiError(Exception):
    """Raise from a route to answer with the envelope."""

    def __init__(
        self, status: int, code: str, message: str, details: Any = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.headers = headers


def envelope(
    status: int, code: str, message: str, details: Any = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = {"code": code, "message": message, "details": details, "correlation_id": current_correlation_id()}
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def _field_errors(errors: Any) -> list[dict[str, Any]]:
    return [
        {"loc": list(error.get("loc", ())), "message": error.get("msg", ""), "type": error.get("type", "")}
        for error in errors
    ]


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return envelope(exc.status, exc.code, exc.message, exc.details, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = _field_errors(exc.errors())
        return envelope(422, "validation_error", f"the request has {len(errors)} invalid field(s)", errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
        return envelope(exc.status_code, code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(JobNotFoundError)
    async def _not_found(_request: Request, exc: JobNotFoundError) -> JSONResponse:
        return envelope(404, "job_not_found", str(exc), {"job_id": exc.job_id})

    @app.exception_handler(WorkflowNotFoundError)
    async def _workflow_not_found(_request: Request, exc: WorkflowNotFoundError) -> JSONResponse:
        return envelope(404, "workflow_not_found", str(exc), {"workflow_id": exc.workflow_id})

    @app.exception_handler(JobStateError)
    async def _conflict(_request: Request, exc: JobStateError) -> JSONResponse:
        return envelope(409, "job_state_conflict", str(exc), {"job_id": exc.job_id, "state": exc.state})

    @app.exception_handler(UnknownTaskError)
    async def _unknown_task(_request: Request, exc: UnknownTaskError) -> JSONResponse:
        return envelope(422, "unknown_task", str(exc), {"task": exc.name})

    @app.exception_handler(TaskArgumentsError)
    async def _bad_arguments(_request: Request, exc: TaskArgumentsError) -> JSONResponse:
        return envelope(422, "invalid_job", exc.summary, exc.problems)

    @app.exception_handler(StorageError)
    async def _storage(_request: Request, exc: StorageError) -> JSONResponse:
        logger.error("api.storage_error", error=str(exc))
        return envelope(503, "service_unavailable", "the database is unavailable; try again shortly")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # The details go to the log, keyed by correlation id; the client gets nothing internal.
        logger.error("api.unexpected_error", path=request.url.path, error_type=type(exc).__name__, exc_info=exc)
        return envelope(500, "internal_error", INTERNAL_ERROR_MESSAGE)


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorEnvelope, "description": code.replace("_", " ")}
    for status, code in {
        400: "bad_request",
        401: "unauthorized",
        403: "forbidden",
        413: "payload_too_large",
        422: "validation_error",
        500: "internal_error",
        503: "service_unavailable",
    }.items()
}
"""Documented on every route, so the OpenAPI contract names every error a client can meet."""
