"""Conveyor on PostgreSQL 15 (asyncpg; NOTIFY wakes idle workers; claims with FOR UPDATE SKIP LOCKED).

General setup (W1, W2): ``conveyor worker --processes 3`` (forked by the command once it has
started, so all of them claim from the first moment) x concurrency 1,000; claims take
``min(free slots, claim_batch_size=1000)`` jobs; other settings default. Three processes on two
cores: each waits on the database for part of its time (a claim of 1,000 jobs takes 10 to 40 ms
here), and a third keeps both cores busy meanwhile. Tuned on W1 with 10,000 jobs (2026-12-01,
after the workers stopped making an HTTP client at start-up): 3 processes a median of about
44,600 jobs/s over 15 runs, 4 about 40,700, 2 about 37,000; claim batch 500 about 27,000. Of
the idle processes one at a time listens for new jobs, so W2 costs the same with 3 processes as
with 1 (before that, each enqueue woke all three: 2.1 to 2.6 ms against 1.5 to 1.9). PgQueuer,
tuned the same way, is best with 2 (see its module). W5 runs W1 with 1 to 4 processes. I/O
setup (W3): 1 process x concurrency 100.
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
