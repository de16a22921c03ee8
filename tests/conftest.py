from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from conveyor import Conveyor
from conveyor.settings import Settings
from conveyor.storage import open_store
from tests.support import postgres

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Tests see no CONVEYOR_* settings but their own, and no .env from the developer's folder."""
    for name in list(os.environ):
        if name.startswith("CONVEYOR_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'conveyor.db'}"


@pytest.fixture
def effects_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "effects.log"
    monkeypatch.setenv("CONVEYOR_TEST_EFFECTS", str(path))
    return path


@pytest.fixture
async def app(database_url: str) -> AsyncIterator[Conveyor]:
    """A fresh app on its own SQLite file, with short timings so tests run fast."""
    conveyor = Conveyor(
        database_url=database_url,
        lease_seconds=2,
        poll_interval_seconds=0.05,
        shutdown_grace_seconds=1,
        cpu_workers=2,
    )
    yield conveyor
    await conveyor.close()


@pytest.fixture(scope="session")
def migrated_sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One SQLite file migrated once per run; tests copy it (migrating is the slow part)."""
    path = tmp_path_factory.mktemp("template") / "migrated.db"

    async def migrate() -> None:
        opened = await open_store(Settings(database_url=f"sqlite:///{path}"))
        await opened.close()

    asyncio.run(migrate())
    return path


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    """This run's own PostgreSQL database, migrated; dropped when the run ends.

    In CI (CI=true) an unreachable server fails the run; elsewhere the PostgreSQL half of the
    suite is skipped, with the reason shown.
    """
    problem = postgres.run_sync(postgres.reachable())
    if problem is not None:
        message = f"PostgreSQL is not reachable at {postgres.SERVER_URL} ({problem})"
        if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
            pytest.fail(message)
        pytest.skip(message)
    name = postgres.run_sync(postgres.create_database())
    url = postgres.database_url(name)

    async def migrate() -> None:
        opened = await open_store(Settings(database_url=url, auto_migrate=True))
        await opened.close()

    try:
        postgres.run_sync(migrate())
        yield url
    finally:
        postgres.run_sync(postgres.drop_database(name))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend_url(request: pytest.FixtureRequest, tmp_path: Path, migrated_sqlite_template: Path) -> str:
    """A migrated, empty database on each backend: the contract suites run on both."""
    if request.param == "sqlite":
        path = tmp_path / "conveyor.db"
        shutil.copyfile(migrated_sqlite_template, path)
        return f"sqlite:///{path}"
    url = request.getfixturevalue("postgres_database")
    postgres.run_sync(postgres.truncate(url))
    return url
