"""Conveyor on SQLite (WAL, synchronous=NORMAL; idle workers wake on any process's commit to the file, by inotify).

Idle workers also poll every 50 ms behind a read-only check, for jobs that come due later.

General setup (W1, W2): 1 worker process x concurrency 100 (SQLite has one writer at a time;
tuned on W1 with 5,000 jobs: 1 x 100 ran 1,077 jobs/s, 2 x 100 1,141, 1 x 10 530). I/O setup
(W3): 1 process x concurrency 100. The database file lives in the run's scratch directory, on
local disk.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from benchmarks.systems.base import Env
from benchmarks.systems.conveyor_common import ConveyorSystem


class ConveyorSqlite(ConveyorSystem):
    name = "conveyor_sqlite"
    label = "Conveyor (SQLite)"
    storage = "sqlite"
    defaults: ClassVar[Mapping[str, Any]] = {"processes": 1, "concurrency": 100, "claim_batch": 100}

    def __init__(self, env: Env, **options: Any) -> None:
        super().__init__(env, **options)
        self.path: Path | None = None

    @property
    def database_url(self) -> str:
        assert self.path is not None, "prepare() first"
        return f"sqlite:///{self.path}"

    async def prepare(self) -> None:
        self.path = self.scratch("db").with_suffix(".db")
        await super().prepare()

    async def cleanup(self) -> None:
        await super().cleanup()
        if self.path is not None:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)
            self.path = None
