"""Enqueue-to-start latency with an idle, warmed worker: 300 jobs, one at a time.

    uv run python -m benchmarks.latency [--postgres SERVER_URL] [--jobs N]

Latency is the job's ``attempted_at`` (the worker's claim) minus its ``created_at`` (the
enqueue), both on this machine's clock. Each job is awaited before the next is enqueued.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg

from conveyor import Conveyor

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


async def _fresh_postgres(server_url: str) -> str:
    name = f"conveyor_bench_{os.getpid()}"
    connection = await asyncpg.connect(server_url)
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()
    return server_url.rsplit("/", 1)[0] + f"/{name}"


async def _drop_postgres(server_url: str, name: str) -> None:
    connection = await asyncpg.connect(server_url)
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await connection.close()


def _start_worker(database_url: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "CONVEYOR_DATABASE_URL": database_url,
        "CONVEYOR_LOG_LEVEL": "WARNING",
        "PYTHONPATH": str(ROOT),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "conveyor", "worker", "--app", "benchmarks.tasks:app", "--concurrency", "10"],
        env=env,
        cwd=ROOT,
    )


async def measure(database_url: str, jobs: int) -> dict[str, Any]:
    app = Conveyor(database_url=database_url, auto_migrate=True)
    noop = app.task(name="noop")(lambda: None)
    await app.store()
    worker = _start_worker(database_url)
    try:
        warm = await noop.enqueue()
        await app.wait_for_job(warm.id, timeout=60, poll=0.01)
        latencies = []
        for _ in range(jobs):
            job = await noop.enqueue()
            done = await app.wait_for_job(job.id, timeout=30, poll=0.001)
            assert done.attempted_at is not None, f"job {job.id} did not run"
            latencies.append((done.attempted_at - job.created_at).total_seconds() * 1000)
    finally:
        worker.terminate()
        worker.wait(30)
        await app.close()
    latencies.sort()
    return {
        "jobs": jobs,
        "p50_ms": round(statistics.median(latencies), 3),
        "p99_ms": round(latencies[int(len(latencies) * 0.99) - 1], 3),
        "min_ms": round(latencies[0], 3),
        "max_ms": round(latencies[-1], 3),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--jobs", type=int, default=300)
    options = parser.parse_args()
    results = {}
    database_url = await _fresh_postgres(options.postgres)
    try:
        results["postgresql"] = await measure(database_url, options.jobs)
    finally:
        await _drop_postgres(options.postgres, database_url.rsplit("/", 1)[1])
    sqlite_path = RESULTS / "latency-bench.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{sqlite_path}{suffix}").unlink(missing_ok=True)
    results["sqlite"] = await measure(f"sqlite:///{sqlite_path}", options.jobs)
    report = {"benchmark": "enqueue-to-start latency, idle worker", "when": time.strftime("%Y-%m-%d"), **results}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latency.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
