"""Correlation ids and request-size limits, as plain ASGI middleware (no body buffering)."""

from __future__ import annotations

import os
import random
import re

import orjson
import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from conveyor.correlation import bind_correlation_id, reset_correlation_id

HEADER = "x-correlation-id"
_HEADER_BYTES = HEADER.encode()
INTERNAL_ERROR_MESSAGE = "an unexpected error occurred; quote the correlation id to report it"
_VALID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")

logger = structlog.get_logger("conveyor.api")


async def _send_error(send: Send, status: int, code: str, message: str, correlation_id: str | None) -> None:
    body = orjson.dumps(
        {"error": {"code": code, "message": message, "details": None, "correlation_id": correlation_id}}
    )
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if correlation_id:
        headers.append((_HEADER_BYTES, correlation_id.encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# A generator of its own, so requests never move the process-wide `random` state that an
# application may have seeded; reseeded in every forked child, as the module's own is, so forked
# server processes do not make the same ids.
_ids = random.Random()  # noqa: S311 - unique, not secret
os.register_at_fork(after_in_child=_ids.seed)


def _new_correlation_id() -> str:
    """32 random hex digits, as ``uuid4().hex`` but without a system call for entropy per request:
    the id must be unique, not secret."""
    return f"{_ids.getrandbits(128):032x}"


class CorrelationMiddleware:
    """Takes ``X-Correlation-ID`` (validated) or makes one, binds it for logs, echoes it back; and
    answers 413 for a body over ``max_bytes``, judged by Content-Length first, then as it streams.

    One middleware for both, the size check inside the correlation id (so a 413 carries one):
    every layer of middleware costs each request a coroutine and a wrapped ``send``.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = declared = None
        for name, value in scope["headers"]:  # the first of each counts
            if name == _HEADER_BYTES and given is None:
                given = value.decode("latin-1")
            elif name == b"content-length" and declared is None:
                declared = value
        if given is not None and not _VALID.match(given):
            await _send_error(
                send,
                400,
                "invalid_correlation_id",
                "X-Correlation-ID must be 1 to 128 characters of letters, digits and ._:@/+=-",
                None,
            )
            return
        correlation_id = given or _new_correlation_id()
        echoed = (_HEADER_BYTES, correlation_id.encode("latin-1"))
        started = False
        too_large = False  # a 413 went out: whatever the app sends after it is dropped

        async def send_with_header(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = [pair for pair in message.get("headers", ()) if pair[0].lower() != _HEADER_BYTES]
                headers.append(echoed)
                message = {**message, "headers": headers}
            await send(message)

        async def app_send(message: Message) -> None:
            if not too_large:
                await send_with_header(message)

        received = 0

        async def counting_receive() -> Message:
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # Answer now and tell the app the client left: whatever it sends after is dropped.
                    if not too_large:
                        too_large = True
                        await self._send_too_large(send_with_header, correlation_id)
                    return {"type": "http.disconnect"}
            return message

        # Bound by hand rather than with correlated(): two context managers per request cost
        # more than everything else this middleware does.
        token = bind_correlation_id(correlation_id)
        log_tokens = structlog.contextvars.bind_contextvars(correlation_id=correlation_id)
        try:
            if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
                await self._send_too_large(send_with_header, correlation_id)
                return
            await self.app(scope, counting_receive, app_send)
        except Exception as exc:
            # Answered here, not by Starlette's outermost error handler: that one runs after
            # this middleware is done, so its 500 would carry no correlation id at all.
            if started:
                raise
            path = scope.get("path")
            logger.exception("api.unexpected_error", path=path, error_type=type(exc).__name__)
            await _send_error(send, 500, "internal_error", INTERNAL_ERROR_MESSAGE, correlation_id)
        finally:
            structlog.contextvars.reset_contextvars(**log_tokens)
            reset_correlation_id(token)

    async def _send_too_large(self, send: Send, correlation_id: str) -> None:
        message = f"the request body is over the limit of {self.max_bytes} bytes"
        await _send_error(send, 413, "payload_too_large", message, correlation_id)
