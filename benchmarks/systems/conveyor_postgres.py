"""Conveyor on PostgreSQL 15 (asyncpg; NOTIFY wakes idle workers; claims with FOR UPDATE SKIP LOCKED).

General setup (W1, W2): ``conveyor worker --processes 2`` (one per core, forked by the command
once it has started, so both claim from the first moment) x concurrency 1,000; claims take
``min(free slots, claim_batch_size=1000)`` jobs; other settings default. Tuned on W1 with
10,000 jobs, six runs each (medians): concurrency and claim batch 100 ran about 22,000 jobs/s,
500 about 27,000, 1,000 about 29,000, concurrency 2,000 with batch 1,000 about 25,000 (an
earlier tuning, of code many times slower, had 2 processes beat 1 and 4). W5 runs W1 with 1,
2 and 4 processes. I/O setup (W3): 1 process x concurrency 100.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from benchmarks.systems.base import PostgresSystem
from benchmarks.systems.conveyor_common import ConveyorSystem


class ConveyorPostgres(ConveyorSystem, PostgresSystem):
    name = "conveyor_postgres"
    label = "Conveyor (PostgreSQL)"
    defaults: ClassVar[Mapping[str, Any]] = {"processes": 2, "concurrency": 1000, "claim_batch": 1000}

    @property
    def database_url(self) -> str:
        return self.dsn
