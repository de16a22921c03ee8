"""Logging, configured once at an entry point: JSON lines off a terminal, readable on one.

Conveyor's own events take structlog's native path: a filtering bound logger renders the event
dict and writes one line, with no ``LogRecord``, handler chain or formatter copy in between. That
path costs a fraction of the stdlib one, which matters because a busy worker writes a line per
finished job. Everything else (uvicorn, SQLAlchemy, the host application) logs through stdlib
``logging``; a root handler renders those records with the same processors into the same stream,
so an operator reads one uniform stream.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from datetime import UTC, datetime
from typing import Any

import orjson
import structlog

from conveyor.settings import Settings

# Below this level Conveyor skips building an event at all. Until configure_logging runs the host
# application's structlog setup decides, so nothing is skipped here.
_threshold = logging.NOTSET
# Set while configure_logging's JSON pipeline is in charge: the writer per-job lines go to directly.
_json_writer: _NamedWriteLogger | None = None


_LEVEL_NUMBERS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def enabled_for(level: str) -> bool:
    """Whether an event at ``level`` ("info") would be written; lets hot paths skip building its fields."""
    return _LEVEL_NUMBERS[level] >= _threshold


def log_hot(logger_name: str, level: str, event: str, fields: dict[str, Any]) -> None:
    """Write one event from a per-job path at a fraction of structlog's cost.

    structlog's generic machinery (lazy proxy, bound logger, processor loop, context merge) costs
    several times the rendering itself, and a busy worker writes one line per finished job. When
    the JSON pipeline is the one configure_logging set up, its processors are known, so the line is
    rendered here directly with the same keys: the caller's fields (which carry the job's identity
    and correlation id explicitly), event, level, logger and timestamp. Under any other
    configuration (a console, or the host's own structlog setup) the event goes through structlog.
    """
    if not enabled_for(level):
        return
    writer = _json_writer
    if writer is None:
        getattr(structlog.get_logger(logger_name), level)(event, **fields)
        return
    writer.msg(
        _orjson_text({**fields, "event": event, "level": level, "logger": logger_name, "timestamp": datetime.now(UTC)})
    )


class ShortNameFilter(logging.Filter):
    """Adds ``record.short_name`` (the last part of the logger name) without touching ``name``.

    A formatter that rewrote ``record.name`` would change the record for every other handler
    on the logger too; a filter that adds an attribute changes nothing anyone else reads.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        record.short_name = record.name.rsplit(".", 1)[-1]
        return True


class _NamedWriteLogger(structlog.WriteLogger):
    """structlog's line writer (one lock per stream) that knows its logger name and flushes late.

    On an event loop the flush waits for the end of the current loop iteration, so the lines of
    a batch of finished jobs reach the stream in one write instead of one system call each; a
    line is never held longer than that. Off a loop (threads, scripts) each line is flushed at once.
    """

    def __init__(self, stream: Any, name: str) -> None:
        super().__init__(stream)
        self.name = name
        # The loop a flush is scheduled on; a loop closed before running it doesn't block the next.
        self._flush_scheduled_on: asyncio.AbstractEventLoop | None = None

    def msg(self, message: str) -> None:
        with self._lock:
            self._write(message + "\n")
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._flush_now()
            return
        if self._flush_scheduled_on is not loop:
            self._flush_scheduled_on = loop
            loop.call_soon(self._flush_now)

    def _flush_now(self) -> None:
        self._flush_scheduled_on = None
        with self._lock:
            self._flush()

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


class _WriteLoggerFactory:
    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._loggers: dict[str, _NamedWriteLogger] = {}

    def __call__(self, *args: Any) -> _NamedWriteLogger:
        name = str(args[0]) if args else "conveyor"
        found = self._loggers.get(name)
        if found is None:
            found = self._loggers[name] = _NamedWriteLogger(self._stream, name)
        return found


class _ConveyorHandler(logging.Handler):
    """Writes stdlib records through the same line writer, so both paths share one stream lock.

    Told apart by its class, so that configuring again replaces it instead of adding a second.
    """

    def __init__(self, stream: Any) -> None:
        super().__init__()
        self._writer = structlog.WriteLogger(stream)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._writer.msg(self.format(record))
        except Exception:  # noqa: BLE001 - logging must never take the caller down
            self.handleError(record)


def configure_logging(settings: Settings, *, stream: Any = None) -> None:
    """Set up structlog's native pipeline and route stdlib ``logging`` into the same stream."""
    global _threshold, _json_writer  # noqa: PLW0603 - process-wide by nature, like logging's own
    stream = stream or sys.stderr
    use_json = settings.log_format == "json" or (settings.log_format == "auto" and not stream.isatty())
    level = logging.getLevelNamesMapping()[settings.log_level]
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.stdlib.add_logger_name,
        # orjson writes the datetime as ISO 8601 itself, in a fraction of isoformat()'s time.
        _add_utc_datetime if use_json else structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer(serializer=_orjson_text)
        if use_json
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    exceptions: list[Any] = [structlog.processors.format_exc_info] if use_json else []
    structlog.configure(
        processors=[*shared, *exceptions, renderer],
        # Filtering happens in the bound logger's methods: an event below the level is a no-op call.
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=_WriteLoggerFactory(stream),
        # Not cached: loggers made before a reconfiguration (tests, embedding apps) must follow it.
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *exceptions, renderer],
    )
    handler = _ConveyorHandler(stream)
    handler.setFormatter(formatter)
    handler.addFilter(ShortNameFilter())
    root = logging.getLogger()
    for existing in list(root.handlers):
        if isinstance(existing, _ConveyorHandler):
            root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
    _threshold = level
    _json_writer = _NamedWriteLogger(stream, "conveyor") if use_json else None
    # Library chatter stays at WARNING unless asked for.
    for noisy in ("sqlalchemy", "aiosqlite", "alembic", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING if level > logging.DEBUG else logging.INFO)


def _add_utc_datetime(_logger: Any, _name: str, event_dict: Any) -> Any:
    event_dict["timestamp"] = datetime.now(UTC)
    return event_dict


def _orjson_text(value: Any, **_options: Any) -> str:
    # orjson renders a log line several times faster than the json module; anything it cannot
    # encode (a custom object in a log field) falls back to its repr.
    return orjson.dumps(value, default=repr, option=orjson.OPT_UTC_Z).decode()
