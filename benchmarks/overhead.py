"""What observability costs: throughput with Prometheus metrics and JSON logs on, against off.

    uv run python -m benchmarks.overhead [--jobs N] [--runs N]

Each run enqueues N no-op jobs, then drains them with an in-process worker (concurrency 50) on
a fresh database. "on": metrics enabled, JSON log lines at INFO (one per finished job) written
to a file. "off": metrics disabled, logging at WARNING. Runs alternate on/off to share any drift.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg

from conveyor import Conveyor
from conveyor.log import configure_logging
from conveyor.testing import drain

RESULTS = Path(__file__).resolve().parent / "results"
SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"


async def _fresh_database(backend: str, folder: Path, run: int) -> str:
    if backend == "sqlite":
        return f"sqlite:///{folder / f'overhead-{run}.db'}"
    name = f"conveyor_overhead_{os.getpid()}_{run}"
    connection = await asyncpg.connect(SERVER)
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()
    return SERVER.rsplit("/", 1)[0] + f"/{name}"


async def _drop_database(backend: str, url: str) -> None:
    """Leave the server as found: each run's database goes once measured."""
    if backend != "postgresql":
        return
    connection = await asyncpg.connect(SERVER)
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')
    finally:
        await connection.close()


async def one_run(database_url: str, jobs: int, *, observed: bool, log_path: Path) -> float:
    app = Conveyor(
        database_url=database_url,
        auto_migrate=True,
        concurrency=50,
        metrics_enabled=observed,
        log_format="json",
        log_level="INFO" if observed else "WARNING",
    )
    with log_path.open("w") as stream:
        configure_logging(app.settings, stream=stream)

        @app.task
        async def noop() -> None:
            return None

        await app.enqueue_many([noop.job() for _ in range(jobs)])
        started = time.perf_counter()
        stats = await drain(app)
        elapsed = time.perf_counter() - started
        await app.close()
    assert stats.acked == jobs, f"{stats.acked} of {jobs} jobs finished"
    if observed:
        assert sum(1 for _ in log_path.open()) >= jobs, "every finished job wrote its JSON line"
    return jobs / elapsed


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=5_000)
    parser.add_argument("--runs", type=int, default=3)
    options = parser.parse_args()
    report: dict[str, Any] = {"benchmark": "observability overhead", "jobs": options.jobs, "runs": options.runs}
    with tempfile.TemporaryDirectory() as folder:
        run = 0
        for backend in ("sqlite", "postgresql"):
            rates: dict[str, list[float]] = {"off": [], "on": []}
            for _ in range(options.runs):
                for mode in ("off", "on"):
                    run += 1
                    url = await _fresh_database(backend, Path(folder), run)
                    try:
                        log_path = Path(folder) / "log.json"
                        rate = await one_run(url, options.jobs, observed=mode == "on", log_path=log_path)
                    finally:
                        await _drop_database(backend, url)
                    rates[mode].append(rate)
            off, on = statistics.median(rates["off"]), statistics.median(rates["on"])
            report[backend] = {
                "off_jobs_per_s": round(off, 1),
                "on_jobs_per_s": round(on, 1),
                "on_vs_off": round(on / off, 3),
                "all_runs": {mode: [round(rate, 1) for rate in values] for mode, values in rates.items()},
            }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "overhead.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
