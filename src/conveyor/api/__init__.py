"""The HTTP API: ``create_app(conveyor)`` builds it; ``conveyor serve`` runs it with uvicorn."""

from conveyor.api.app import create_app

__all__ = ["create_app"]
