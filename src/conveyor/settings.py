"""Settings from ``CONVEYOR_*`` environment variables and ``.env``, validated all at once."""

from __future__ import annotations

import os
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from conveyor.errors import ConfigError

_MAX_QUEUE_NAME = 255
_DRIVERS = {"sqlite": "sqlite+aiosqlite", "postgresql": "postgresql+asyncpg"}
_SCHEME_ALIASES = {
    "sqlite": "sqlite",
    "sqlite+aiosqlite": "sqlite",
    "postgresql": "postgresql",
    "postgres": "postgresql",
    "postgresql+asyncpg": "postgresql",
}


def normalize_database_url(url: str) -> str:
    """Accept plain ``sqlite:///x.db`` / ``postgresql://...`` and return the async-driver URL."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError(f"{url!r} is not a database URL (expected sqlite:///path.db or postgresql://user@host/db)")
    family = _SCHEME_ALIASES.get(scheme.lower())
    if family is None:
        raise ValueError(f"unsupported database scheme {scheme!r} (use sqlite:///path.db or postgresql://user@host/db)")
    if family == "sqlite":
        path = rest.removeprefix("/")
        if not path or path == ":memory:" or path.startswith("file::memory:"):
            raise ValueError(
                "an in-memory SQLite database cannot be shared by workers; give a file path, e.g. sqlite:///conveyor.db"
            )
    elif not rest.strip("/"):
        raise ValueError(f"{url!r} names no PostgreSQL host or database")
    return f"{_DRIVERS[family]}://{rest}"


class Settings(BaseSettings):
    """Everything Conveyor can be told. Built once at an entry point and passed down."""

    model_config = SettingsConfigDict(env_prefix="CONVEYOR_", env_file=".env", extra="ignore", validate_default=True)

    database_url: str = "sqlite:///conveyor.db"
    """``sqlite:///path.db`` (default: conveyor.db in the working directory) or ``postgresql://...``."""
    app: str | None = None
    """``module:attribute`` of the Conveyor app whose tasks the CLI and workers use."""
    queues: Annotated[tuple[str, ...], NoDecode] = ("default",)
    queue_limits: Annotated[dict[str, int], NoDecode] = Field(default_factory=dict)
    """Queue name -> most jobs of that queue running at once on all workers together."""
    concurrency: int = Field(default=10, ge=1, le=10_000)
    cpu_workers: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1, le=512)
    max_attempts: int = Field(default=5, ge=1, le=1_000)
    """Default attempts for tasks that do not set their own."""
    lease_seconds: float = Field(default=30.0, gt=0.05, le=86_400)
    """How long a claimed job stays leased without a heartbeat; a third of it is the heartbeat."""
    shutdown_grace_seconds: float = Field(default=10.0, ge=0, le=3_600)
    poll_interval_seconds: float | None = Field(default=None, gt=0, le=60)
    """How often an idle worker looks for due jobs; None means 0.05 s on SQLite (a cheap read-only
    check) and 0.5 s on PostgreSQL (where NOTIFY wakes workers for new jobs at once)."""
    rescue_interval_seconds: float | None = Field(default=None, gt=0, le=3_600)
    """How often expired leases are looked for; None means a quarter of ``lease_seconds``."""
    retention_seconds: float = Field(default=7 * 86_400, ge=0)
    """Finished jobs older than this are pruned by workers; 0 keeps them forever."""
    cancel_check_seconds: float = Field(default=0.5, gt=0, le=60)
    """How often a worker asks whether any of its running jobs was cancelled."""
    progress_write_seconds: float = Field(default=1.0, gt=0, le=3_600)
    """How often a worker writes the latest progress its running tasks reported (rate-limits writes)."""
    cancel_grace_seconds: float = Field(default=5.0, ge=0, le=3_600)
    """How long a cancelled sync or CPU task may take to notice before it is abandoned or killed."""
    prune_interval_seconds: float = Field(default=3_600, gt=0)
    schedules_enabled: bool = True
    """Workers enqueue the ticks of the app's periodic schedules on the queues they serve."""
    schedule_interval_seconds: float = Field(default=1.0, gt=0, le=3_600)
    """The longest a worker's scheduler sleeps between looks; it also wakes when a tick comes due."""
    claim_batch_size: int = Field(default=100, ge=1, le=10_000)
    prefetch: int | None = Field(default=None, ge=0, le=10_000)
    """Jobs a worker claims beyond its concurrency, leased and waiting for a slot, so a slot that
    frees starts its next job at once; None means ``min(concurrency, claim_batch_size)``, 0 none."""
    pool_size: int = Field(default=10, ge=1, le=1_000)
    """Connections kept open per process (SQLite: the most it opens)."""
    max_overflow: int = Field(default=10, ge=0, le=1_000)
    """Extra PostgreSQL connections opened under load, beyond ``pool_size``."""
    pool_timeout_seconds: float = Field(default=30.0, gt=0, le=3_600)
    """How long to wait for a free pooled connection before failing."""
    statement_timeout_seconds: float = Field(default=30.0, gt=0, le=86_400)
    """Longest any single database statement may take."""
    sqlite_busy_timeout_seconds: float = Field(default=30.0, gt=0, le=3_600)
    auto_migrate: bool | None = None
    """Bring the schema up to date on first use; None means yes for SQLite, no for PostgreSQL."""
    max_request_bytes: int = Field(default=1_048_576, ge=1_024, le=1_073_741_824)
    """The HTTP API refuses larger request bodies with 413, before reading them whole."""
    batch_limit: int = Field(default=1_000, ge=1, le=100_000)
    """Most jobs one ``POST /jobs/batch`` may carry."""
    workflow_limit: int = Field(default=10_000, ge=1, le=1_000_000)
    """Most steps one ``POST /workflows`` may carry."""
    metrics_enabled: bool = True
    """Collect Prometheus metrics (``GET /metrics``, ``conveyor worker --metrics-port``)."""
    otel_endpoint: str | None = None
    """OTLP/HTTP collector base URL for traces, e.g. http://127.0.0.1:4318; OTEL_EXPORTER_OTLP_ENDPOINT works too."""
    otel_console: bool = False
    """Print finished spans to stdout (for a look without a collector)."""
    otel_service_name: str = "conveyor"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["auto", "json", "console"] = "auto"

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        return normalize_database_url(value.strip())

    @field_validator("queues", mode="before")
    @classmethod
    def _queues(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",")]
        names = tuple(value)
        if not names or any(not name for name in names):
            raise ValueError("queue names must be non-empty, e.g. 'default,emails'")
        return names

    @field_validator("queue_limits", mode="before")
    @classmethod
    def _queue_limits_text(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        pairs = [part.strip() for part in value.split(",") if part.strip()]
        limits: dict[str, int] = {}
        for pair in pairs:
            name, _, cap = (item.strip() for item in pair.partition("="))
            if not name or not (cap.isascii() and cap.isdigit()):
                raise ValueError(f"{pair!r} is not name=N with N a whole number; write e.g. 'reports=2,exports=1'")
            limits[name] = int(cap)
        return limits

    @field_validator("queue_limits")
    @classmethod
    def _queue_limits(cls, value: dict[str, int]) -> dict[str, int]:
        for name, cap in value.items():
            if not name or len(name) > _MAX_QUEUE_NAME:
                raise ValueError(f"queue names must be 1 to {_MAX_QUEUE_NAME} characters, not {name!r}")
            if cap < 1:
                raise ValueError(f"the limit of queue {name!r} must be at least 1, not {cap}")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _log_level(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def should_auto_migrate(self) -> bool:
        return self.is_sqlite if self.auto_migrate is None else self.auto_migrate

    @property
    def poll_interval(self) -> float:
        if self.poll_interval_seconds is not None:
            return self.poll_interval_seconds
        return 0.05 if self.is_sqlite else 0.5

    @property
    def heartbeat_interval(self) -> float:
        return self.lease_seconds / 3

    @property
    def rescue_interval(self) -> float:
        return self.rescue_interval_seconds or self.lease_seconds / 4


def load_settings(**overrides: Any) -> Settings:
    """Build settings, turning every validation problem into one ``ConfigError``."""
    given = {key: value for key, value in overrides.items() if value is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_url=False):
            where = ".".join(str(part) for part in error["loc"]) or "settings"
            env = f"CONVEYOR_{where.upper()}" if error["loc"] else ""
            label = f"{where} ({env})" if env else where
            message = error["msg"].removeprefix("Value error, ")
            problems.append(f"{label}: {message}")
        raise ConfigError("invalid Conveyor settings", problems) from None
