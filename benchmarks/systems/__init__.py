"""The benchmarked systems, one module each, all implementing :class:`benchmarks.systems.base.System`.

Modules are imported only when their system runs, so a peer that fails to import does not stop
the others.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from benchmarks.systems.base import System

REFERENCE = "conveyor_postgres"
"""Every ratio in the report is to this system."""

SYSTEMS: dict[str, str] = {
    "conveyor_postgres": "benchmarks.systems.conveyor_postgres:ConveyorPostgres",
    "conveyor_sqlite": "benchmarks.systems.conveyor_sqlite:ConveyorSqlite",
    "celery_redis": "benchmarks.systems.celery_redis:CeleryRedis",
    "rq": "benchmarks.systems.rq_redis:RqRedis",
    "dramatiq_redis": "benchmarks.systems.dramatiq_redis:DramatiqRedis",
    "arq": "benchmarks.systems.arq_redis:ArqRedisSystem",
    "saq": "benchmarks.systems.saq_redis:SaqRedis",
    "procrastinate": "benchmarks.systems.procrastinate_pg:ProcrastinatePg",
    "pgqueuer": "benchmarks.systems.pgqueuer_pg:PgQueuerPg",
    "oban": "benchmarks.systems.oban_pg:ObanPg",
    "floor_postgres": "benchmarks.systems.floor_postgres:FloorPostgres",
    "floor_sqlite": "benchmarks.systems.floor_sqlite:FloorSqlite",
}
"""Name (as given to ``--only``/``--skip``) -> ``module:class``, in report order."""


def load(name: str) -> type[System]:
    module_name, _, class_name = SYSTEMS[name].partition(":")
    return getattr(importlib.import_module(module_name), class_name)
