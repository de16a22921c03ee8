"""Settings: defaults, environment and .env, URL normalisation, and every problem reported at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from conveyor.errors import ConfigError
from conveyor.settings import Settings, load_settings, normalize_database_url


def test_defaults_use_a_local_sqlite_file_and_the_default_queue() -> None:
    settings = load_settings()

    assert settings.database_url == "sqlite+aiosqlite:///conveyor.db"
    assert settings.is_sqlite
    assert settings.queues == ("default",)
    assert settings.concurrency == 10
    assert settings.max_attempts == 5
    assert settings.lease_seconds == 30.0
    assert settings.auto_migrate is None
    assert settings.should_auto_migrate
    assert settings.log_level == "INFO"
    assert settings.log_format == "auto"
    assert settings.app is None


def test_derived_intervals_follow_the_lease() -> None:
    settings = load_settings(lease_seconds=12)

    assert settings.heartbeat_interval == 4
    assert settings.rescue_interval == 3
    assert load_settings(lease_seconds=12, rescue_interval_seconds=1.5).rescue_interval == 1.5


def test_environment_variables_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_DATABASE_URL", "postgresql://u@h/db")
    monkeypatch.setenv("CONVEYOR_CONCURRENCY", "3")
    monkeypatch.setenv("CONVEYOR_QUEUES", "emails,reports")
    monkeypatch.setenv("CONVEYOR_LOG_LEVEL", "debug")
    monkeypatch.setenv("CONVEYOR_APP", "myapp.jobs:app")

    settings = load_settings()

    assert settings.database_url == "postgresql+asyncpg://u@h/db"
    assert settings.concurrency == 3
    assert settings.queues == ("emails", "reports")
    assert settings.log_level == "DEBUG"
    assert settings.app == "myapp.jobs:app"
    assert not settings.is_sqlite
    assert not settings.should_auto_migrate


def test_a_dotenv_file_in_the_working_directory_is_read(tmp_path: Path) -> None:
    # The autouse fixture made tmp_path the working directory.
    (tmp_path / ".env").write_text("CONVEYOR_MAX_ATTEMPTS=7\nCONVEYOR_QUEUES=a,b\nOTHER_TOOL_SETTING=ignored\n")

    settings = load_settings()

    assert settings.max_attempts == 7
    assert settings.queues == ("a", "b")


def test_environment_variables_win_over_the_dotenv_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / ".env").write_text("CONVEYOR_MAX_ATTEMPTS=7\n")
    monkeypatch.setenv("CONVEYOR_MAX_ATTEMPTS", "9")

    assert load_settings().max_attempts == 9


def test_keyword_overrides_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_CONCURRENCY", "3")

    assert load_settings(concurrency=4).concurrency == 4
    # None means "not given", so the environment still applies.
    assert load_settings(concurrency=None).concurrency == 3


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("sqlite:///x.db", "sqlite+aiosqlite:///x.db"),
        ("sqlite:////var/lib/conveyor/jobs.db", "sqlite+aiosqlite:////var/lib/conveyor/jobs.db"),
        ("sqlite+aiosqlite:///x.db", "sqlite+aiosqlite:///x.db"),
        ("postgresql://u@h/db", "postgresql+asyncpg://u@h/db"),
        ("postgres://u:secret@h:5433/db", "postgresql+asyncpg://u:secret@h:5433/db"),
        ("postgresql+asyncpg://u@h/db", "postgresql+asyncpg://u@h/db"),
        ("  sqlite:///padded.db  ", "sqlite+aiosqlite:///padded.db"),
    ],
)
def test_database_urls_are_normalised_to_async_drivers(given: str, expected: str) -> None:
    assert load_settings(database_url=given).database_url == expected


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("mysql://u@h/db", "unsupported database scheme 'mysql'"),
        ("conveyor.db", "is not a database URL"),
        ("sqlite:///:memory:", "in-memory"),
        ("sqlite://", "in-memory"),
        ("postgresql://", "names no PostgreSQL host or database"),
    ],
)
def test_a_bad_database_url_is_a_config_error_naming_the_setting(url: str, complaint: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(database_url=url)

    (problem,) = caught.value.problems
    assert problem.startswith("database_url (CONVEYOR_DATABASE_URL): ")
    assert complaint in problem
    assert complaint in str(caught.value)


def test_normalize_database_url_raises_value_error_for_bad_urls() -> None:
    with pytest.raises(ValueError, match="unsupported database scheme"):
        normalize_database_url("mysql://u@h/db")


def test_every_bad_value_is_listed_in_one_config_error() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(
            database_url="mysql://u@h/db",
            concurrency=0,
            lease_seconds=-1,
            log_level="loud",
            queues="a,,b",
        )

    problems = caught.value.problems
    labels = sorted(problem.split(":", 1)[0] for problem in problems)
    assert labels == [
        "concurrency (CONVEYOR_CONCURRENCY)",
        "database_url (CONVEYOR_DATABASE_URL)",
        "lease_seconds (CONVEYOR_LEASE_SECONDS)",
        "log_level (CONVEYOR_LOG_LEVEL)",
        "queues (CONVEYOR_QUEUES)",
    ]
    message = str(caught.value)
    for problem in problems:
        assert problem in message


def test_bad_environment_variables_are_all_listed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_DATABASE_URL", "sqlite:///:memory:")
    monkeypatch.setenv("CONVEYOR_CONCURRENCY", "lots")
    monkeypatch.setenv("CONVEYOR_MAX_ATTEMPTS", "0")

    with pytest.raises(ConfigError) as caught:
        load_settings()

    labels = sorted(problem.split(" ", 1)[0] for problem in caught.value.problems)
    assert labels == ["concurrency", "database_url", "max_attempts"]


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("a,b", ("a", "b")),
        (" a , b ", ("a", "b")),
        ("emails", ("emails",)),
        (("x", "y"), ("x", "y")),
    ],
)
def test_queues_are_parsed_from_a_comma_separated_list(given: str | tuple[str, ...], expected: tuple[str, ...]) -> None:
    assert load_settings(queues=given).queues == expected


@pytest.mark.parametrize("given", ["", "a,", ",b", "a,,b"])
def test_empty_queue_names_are_refused(given: str) -> None:
    with pytest.raises(ConfigError, match="queue names must be non-empty"):
        load_settings(queues=given)


def test_auto_migrate_can_be_switched_off_for_sqlite_and_on_for_postgresql() -> None:
    assert not load_settings(auto_migrate=False).should_auto_migrate
    assert load_settings(database_url="postgresql://u@h/db", auto_migrate=True).should_auto_migrate


def test_settings_ignore_unrelated_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_NOT_A_SETTING", "whatever")

    assert isinstance(load_settings(), Settings)
