"""Logging: the short-name filter leaves records alone; configure_logging writes JSON lines."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from conveyor import log
from conveyor.log import ShortNameFilter, configure_logging, log_hot
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
def restore_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """configure_logging changes process-wide state: put it back after the test."""
    for name in ("_threshold", "_json_writer"):
        monkeypatch.setattr(log, name, getattr(log, name))  # restored at teardown
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


class CountingStream(io.StringIO):
    """A stream that counts how often it is flushed."""

    def __init__(self) -> None:
        super().__init__()
        self.flushes = 0

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


@pytest.mark.usefixtures("restore_logging")
def test_a_hot_line_has_the_keys_and_values_of_the_structlog_line_for_the_same_event() -> None:
    stream = io.StringIO()
    configure_logging(Settings(log_format="json"), stream=stream)
    fields = {"job_id": "abc", "task": "noop", "attempt": 2, "duration_ms": 0.5}

    structlog.get_logger("conveyor.worker").info("job.succeeded", **fields)
    log_hot("conveyor.worker", "info", "job.succeeded", fields)

    slow, hot = json_lines(stream)
    assert slow.pop("timestamp").endswith("Z")
    assert hot.pop("timestamp").endswith("Z")
    assert hot == slow


@pytest.mark.usefixtures("restore_logging")
def test_hot_lines_respect_the_level() -> None:
    stream = io.StringIO()
    configure_logging(Settings(log_format="json", log_level="WARNING"), stream=stream)

    log_hot("conveyor.worker", "info", "job.succeeded", {})
    log_hot("conveyor.worker", "error", "job.dead", {"job_id": "abc"})

    assert [line["event"] for line in json_lines(stream)] == ["job.dead"]


@pytest.mark.usefixtures("restore_logging")
def test_hot_lines_go_through_structlog_when_the_pipeline_is_not_json() -> None:
    stream = io.StringIO()
    configure_logging(Settings(log_format="console"), stream=stream)

    log_hot("conveyor.worker", "info", "job.succeeded", {"job_id": "abc"})

    assert "job.succeeded" in stream.getvalue()
    assert "job_id=abc" in stream.getvalue()


@pytest.mark.usefixtures("restore_logging")
def test_lines_written_on_an_event_loop_are_flushed_once_at_the_end_of_the_iteration() -> None:
    stream = CountingStream()
    configure_logging(Settings(log_format="json"), stream=stream)

    async def burst() -> int:
        for number in range(10):
            log_hot("conveyor.worker", "info", "job.succeeded", {"n": number})
        flushes_during_the_burst = stream.flushes
        await asyncio.sleep(0)  # lets the loop finish the iteration
        return flushes_during_the_burst

    assert asyncio.run(burst()) == 0
    assert stream.flushes == 1
    assert [line["n"] for line in json_lines(stream)] == list(range(10))


@pytest.mark.usefixtures("restore_logging")
def test_off_a_loop_each_line_is_flushed_at_once() -> None:
    stream = CountingStream()
    configure_logging(Settings(log_format="json"), stream=stream)

    structlog.get_logger("conveyor.test").info("one")
    structlog.get_logger("conveyor.test").info("two")

    assert stream.flushes == 2


@pytest.mark.usefixtures("restore_logging")
def test_a_loop_closed_before_its_flush_ran_does_not_hold_back_later_lines() -> None:
    stream = CountingStream()
    configure_logging(Settings(log_format="json"), stream=stream)
    abandoned = asyncio.new_event_loop()

    def write_then_stop() -> None:
        log_hot("conveyor.worker", "info", "job.succeeded", {"n": 1})
        abandoned.stop()  # the loop ends this iteration; the flush scheduled for the next never runs

    abandoned.call_soon(write_then_stop)
    abandoned.run_forever()
    abandoned.close()
    assert stream.flushes == 0

    async def write_and_yield() -> None:
        log_hot("conveyor.worker", "info", "job.succeeded", {"n": 2})
        await asyncio.sleep(0)

    asyncio.run(write_and_yield())

    assert stream.flushes == 1
    assert [line["n"] for line in json_lines(stream)] == [1, 2]
