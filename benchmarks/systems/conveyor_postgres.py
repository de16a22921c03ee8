"""Conveyor on PostgreSQL 15 (asyncpg; NOTIFY wakes idle workers; claims with FOR UPDATE SKIP LOCKED).

General setup (W1, W2): 2 worker processes (one per core) x concurrency 100; claims take
``min(free slots, claim_batch_size=100)`` jobs; other settings default. Tuned on W1 with 5,000
jobs: 2 x 100 ran 5,021 jobs/s, 2 x 50 3,300, 2 x 200 2,826, 1 x 100 2,584 (and with 10,000
jobs 2 processes beat 4 twice: 5,318 vs 3,563, 3,919 vs 3,425). W5 runs W1 with 1, 2 and 4.
I/O setup (W3): 1 process x concurrency 100.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from benchmarks.systems.base import PostgresSystem
from benchmarks.systems.conveyor_common import ConveyorSystem


class ConveyorPostgres(ConveyorSystem, PostgresSystem):
    name = "conveyor_postgres"
    label = "Conveyor (PostgreSQL)"
    defaults: ClassVar[Mapping[str, Any]] = {"processes": 2, "concurrency": 100, "claim_batch": 100}

    @property
    def database_url(self) -> str:
        return self.dsn
