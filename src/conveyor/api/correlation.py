"""Correlation ids and request-size limits, as plain ASGI middleware (no body buffering)."""

from __future__ import annotations

import re
import uuid

import orjson
import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from conveyor.correlation import correlated, current_correlation_id

HEADER = "x-correlation-id"
INTERNAL_ERROR_MESSAGE = "an unexpected error occurred; quote the correlation id to report it"
_VALID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")

logger = structlog.get_logger("conveyor.api")


async def _send_error(send: Send, status: int, code: str, message: str, correlation_id: str | None) -> None:
    body = orjson.dumps(
        {"error": {"code": code, "message": message, "details": None, "correlation_id": correlation_id}}
    )
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if correlation_id:
        headers.append((HEADER.encode(), correlation_id.encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class CorrelationMiddleware:
    """Takes ``X-Correlation-ID`` (validated) or makes one, binds it for logs, echoes it back."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((value.decode("latin-1") for name, value in scope["headers"] if name == HEADER.encode()), None)
        if given is not None and not _VALID.match(given):
            await _send_error(
                send,
                400,
                "invalid_correlation_id",
                "X-Correlation-ID must be 1 to 128 characters of letters, digits and ._:@/+=-",
                None,
            )
            return
        correlation_id = given or uuid.uuid4().hex
        started = False

        async def send_with_header(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = [pair for pair in message.get("headers", []) if pair[0].lower() != HEADER.encode()]
                headers.append((HEADER.encode(), correlation_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        with correlated(correlation_id):
            try:
                await self.app(scope, receive, send_with_header)
            except Exception as exc:
                # Answered here, not by Starlette's outermost error handler: that one runs after
                # this middleware is done, so its 500 would carry no correlation id at all.
                if started:
                    raise
                path = scope.get("path")
                logger.exception("api.unexpected_error", path=path, error_type=type(exc).__name__)
                await _send_error(send, 500, "internal_error", INTERNAL_ERROR_MESSAGE, correlation_id)


class BodyLimitMiddleware:
    """Answers 413 for a body over the limit, judged by Content-Length first, then as it streams."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = next((value for name, value in scope["headers"] if name == b"content-length"), None)
        too_large = f"the request body is over the limit of {self.max_bytes} bytes"
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await _send_error(send, 413, "payload_too_large", too_large, current_correlation_id())
            return
        received = 0
        answered = False

        async def counting_receive() -> Message:
            nonlocal received, answered
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # Answer now and tell the app the client left: whatever it sends after is dropped.
                    if not answered:
                        answered = True
                        await _send_error(send, 413, "payload_too_large", too_large, current_correlation_id())
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            if not answered:
                await send(message)

        await self.app(scope, counting_receive, guarded_send)
