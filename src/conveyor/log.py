"""Logging, configured once at an entry point: JSON lines off a terminal, readable on one."""

from __future__ import annotations

import logging
import sys
from typing import Any

import orjson
import structlog

from conveyor.settings import Settings


class ShortNameFilter(logging.Filter):
    """Adds ``record.short_name`` (the last part of the logger name) without touching ``name``.

    A formatter that rewrote ``record.name`` would change the record for every other handler
    on the logger too; a filter that adds an attribute changes nothing anyone else reads.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        record.short_name = record.name.rsplit(".", 1)[-1]
        return True


class _ConveyorHandler(logging.StreamHandler[Any]):
    """Our handler, told apart so that configuring again replaces it instead of adding a second."""


def configure_logging(settings: Settings, *, stream: Any = None) -> None:
    """Route structlog and the standard library's logging through one structlog pipeline."""
    stream = stream or sys.stderr
    use_json = settings.log_format == "json" or (settings.log_format == "auto" and not stream.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer(serializer=_orjson_text)
        if use_json
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    structlog.configure(
        # Level first: a debug event below the level costs nothing more.
        processors=[structlog.stdlib.filter_by_level, *shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Not cached: loggers made before a reconfiguration (tests, embedding apps) must follow it.
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info if use_json else _identity,
            renderer,
        ],
    )
    handler = _ConveyorHandler(stream)
    handler.setFormatter(formatter)
    handler.addFilter(ShortNameFilter())
    root = logging.getLogger()
    for existing in list(root.handlers):
        if isinstance(existing, _ConveyorHandler):
            root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(settings.log_level)
    # Library chatter stays at WARNING unless asked for.
    for noisy in ("sqlalchemy", "aiosqlite", "alembic", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING if settings.log_level != "DEBUG" else logging.INFO)


def _identity(_logger: Any, _name: str, event_dict: Any) -> Any:
    return event_dict


def _orjson_text(value: Any, **_options: Any) -> str:
    # orjson renders a log line several times faster than the json module; anything it cannot
    # encode (a custom object in a log field) falls back to its repr.
    return orjson.dumps(value, default=repr).decode()
