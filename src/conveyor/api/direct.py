"""Routes whose common request skips FastAPI's generic request handler.

FastAPI answers every request through one general handler: it parses the body by its content
type, solves the dependency tree, validates each parameter, then validates and serializes the
return value. For the API's two busiest routes (submitting a job, reading one) that machinery
cost more CPU than everything else the server does for the request, database included.

A route declared with ``DirectRoute`` may carry a direct handler (``@answered_directly``): a
function that reads the request itself and either answers it or returns None. None hands the
request, unchanged, to FastAPI's own handler, which then parses, validates and answers it as it
would without a direct handler, errors and all. So a direct handler only ever answers requests
that FastAPI would accept too, and declines before it has done anything with side effects.
Everything around the handler (routing, middleware, the error envelope's exception handlers, the
OpenAPI document) is FastAPI's as before, and an app with dependency overrides in place gets
FastAPI's handler for every request, overrides honoured.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response

DirectHandler = Callable[[Request], Awaitable[Response | None]]
Endpoint = TypeVar("Endpoint", bound=Callable[..., Any])

_ATTRIBUTE = "__conveyor_direct__"


def answered_directly(handler: DirectHandler) -> Callable[[Endpoint], Endpoint]:
    """Give an endpoint a direct handler (above or below its route decorator)."""

    def attach(endpoint: Endpoint) -> Endpoint:
        setattr(endpoint, _ATTRIBUTE, handler)
        return endpoint

    return attach


class DirectRoute(APIRoute):
    """An API route that tries its endpoint's direct handler, if it has one, before FastAPI's."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        standard = super().get_route_handler()
        endpoint = self.endpoint

        async def handler(request: Request) -> Response:
            # Looked up per request, not once here: FastAPI builds this handler when the route
            # is declared, which may be before the direct handler is attached.
            direct: DirectHandler | None = getattr(endpoint, _ATTRIBUTE, None)
            # Dependency overrides (an app embedding this one, a test) apply to FastAPI's
            # handler only: with any in place, every request goes that way.
            if direct is None or getattr(request.app, "dependency_overrides", None):
                return await standard(request)
            response = await direct(request)
            return response if response is not None else await standard(request)

        return handler
