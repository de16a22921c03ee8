from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from conveyor import Conveyor

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
