"""Conveyor on PostgreSQL 15 (asyncpg; NOTIFY wakes idle workers; claims with FOR UPDATE SKIP LOCKED).

General setup (W1, W2): ``conveyor worker --processes 3`` (forked by the command once it has
started, so all of them claim from the first moment) x concurrency 1,000; claims take
``min(free slots, claim_batch_size=1000)`` jobs; other settings default. Three processes on two
cores: each waits on the database for part of its time (a claim of 1,000 jobs takes 10 to 40 ms
here), and a third keeps both cores busy meanwhile. Tuned on W1 with 10,000 jobs (medians of
four runs, 2026-12-01): 2 processes about 34,000 jobs/s, 3 about 40,000, 4 about 32,500;
concurrency and claim batch 500 about 33,000, concurrency 2,000 with batch 1,000 no better than
1,000. The third process costs W2 about 0.1 ms (1.98 ms against 1.86, medians of three runs):
each enqueue's NOTIFY wakes one more idle process. PgQueuer, tuned the same way, is best with
2 (see its module). W5 runs W1 with 1 to 4 processes. I/O setup (W3): 1 process x concurrency 100.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from benchmarks.systems.base import PostgresSystem
from benchmarks.systems.conveyor_common import ConveyorSystem


class ConveyorPostgres(ConveyorSystem, PostgresSystem):
    name = "conveyor_postgres"
    label = "Conveyor (PostgreSQL)"
    defaults: ClassVar[Mapping[str, Any]] = {"processes": 3, "concurrency": 1000, "claim_batch": 1000}

    @property
    def database_url(self) -> str:
        return self.dsn
