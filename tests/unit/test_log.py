"""Logging: the short-name filter leaves records alone; configure_logging writes JSON lines."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from conveyor.log import ShortNameFilter, configure_logging
from conveyor.settings import Settings

_NOISY = ("sqlalchemy", "aiosqlite", "alembic", "asyncio")


class Capture(logging.Handler):
    """Keeps what each record looked like when this handler saw it."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.names.append(record.name)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """configure_logging changes process-wide state: put it back after the test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    noisy_levels = {name: logging.getLogger(name).level for name in _NOISY}
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    for name, noisy_level in noisy_levels.items():
        logging.getLogger(name).setLevel(noisy_level)
    structlog.reset_defaults()


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_short_name_filter_leaves_the_record_name_alone_for_other_handlers(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("tests.log.conveyor.engine.worker")
    formatted = io.StringIO()
    short = logging.StreamHandler(formatted)
    short.setFormatter(logging.Formatter("%(short_name)s|%(name)s|%(message)s"))
    short.addFilter(ShortNameFilter())
    capture = Capture()
    logger.addHandler(short)  # first, so it has run by the time the others see the record
    logger.addHandler(capture)
    try:
        with caplog.at_level(logging.INFO, logger=logger.name):
            logger.info("claimed %d jobs", 3)
    finally:
        logger.removeHandler(short)
        logger.removeHandler(capture)

    assert formatted.getvalue() == "worker|tests.log.conveyor.engine.worker|claimed 3 jobs\n"
    assert capture.names == ["tests.log.conveyor.engine.worker"]
    assert [record.name for record in caplog.records] == ["tests.log.conveyor.engine.worker"]


def test_short_name_of_a_top_level_logger_is_its_name() -> None:
    record = logging.LogRecord("conveyor", logging.INFO, __file__, 1, "msg", None, None)

    assert ShortNameFilter().filter(record)
    assert record.__dict__["short_name"] == "conveyor"
    assert record.name == "conveyor"


@pytest.mark.usefixtures("restore_logging")
def test_json_format_writes_structlog_and_stdlib_lines_as_json() -> None:
    stream = io.StringIO()
    configure_logging(Settings(log_format="json"), stream=stream)

    structlog.get_logger("conveyor.test").info("job.succeeded", job_id="abc", attempt=2)
    logging.getLogger("some.lib").warning("disk %s is %d%% full", "/var", 91)

    ours, theirs = json_lines(stream)
    assert ours["event"] == "job.succeeded"
    assert ours["level"] == "info"
    assert (ours["job_id"], ours["attempt"]) == ("abc", 2)
    assert ours["logger"] == "conveyor.test"
    assert "timestamp" in ours
    assert theirs["event"] == "disk /var is 91% full"
    assert theirs["level"] == "warning"
    assert theirs["logger"] == "some.lib"


@pytest.mark.usefixtures("restore_logging")
def test_json_lines_respect_the_configured_level() -> None:
    stream = io.StringIO()
    configure_logging(Settings(log_format="json", log_level="WARNING"), stream=stream)

    logging.getLogger("some.lib").info("not shown")
    structlog.get_logger("conveyor.test").info("not shown either")
    logging.getLogger("some.lib").error("shown")

    assert [line["event"] for line in json_lines(stream)] == ["shown"]


@pytest.mark.usefixtures("restore_logging")
def test_exceptions_are_rendered_into_the_json_line() -> None:
    stream = io.StringIO()
    configure_logging(Settings(log_format="json"), stream=stream)

    try:
        raise ValueError("broken input")  # noqa: TRY301 - raised to be logged
    except ValueError:
        logging.getLogger("some.lib").exception("task failed")

    (line,) = json_lines(stream)
    assert line["event"] == "task failed"
    assert line["level"] == "error"
    assert "ValueError: broken input" in line["exception"]


@pytest.mark.usefixtures("restore_logging")
def test_configuring_again_replaces_the_handler_instead_of_adding_one() -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging(Settings(log_format="json"), stream=first)
    configure_logging(Settings(log_format="json"), stream=second)

    logging.getLogger("some.lib").warning("once")

    assert first.getvalue() == ""
    assert [line["event"] for line in json_lines(second)] == ["once"]
