"""W4: the HTTP API against the floor of the same stack, with wrk on loopback.

    uv run python -m benchmarks.http [--seconds 10] [--connections 50] [--runs 3]

Measures `POST /jobs` and `GET /jobs/{id}` requests/s on `conveyor serve --no-worker` (SQLite and
PostgreSQL), and the same two routes on a bare FastAPI app (pydantic in, pydantic out, no
database) served by the same uvicorn settings: one process, no access log. Each run measures the
three servers back to back, and each ratio is taken within its run; the figures are the runs'
medians with their min and max. Needs `wrk` (Debian: apt-get install wrk).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from benchmarks.systems.base import summarize

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"
BODY = json.dumps({"task": "noop", "args": [], "kwargs": {}})


def _free_port() -> int:
    import socket  # noqa: PLC0415

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wrk(url: str, seconds: int, connections: int, script: Path | None) -> float:
    command = ["wrk", "-t", "1", "-c", str(connections), "-d", f"{seconds}s", "--latency"]
    if script:
        command += ["-s", str(script)]
    output = subprocess.run([*command, url], capture_output=True, text=True, timeout=seconds + 30, check=True).stdout
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if errors:
        raise RuntimeError(f"{errors.group(1)} failed requests:\n{output}")
    return float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]


async def _wait_healthy(base: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    async with httpx.AsyncClient(timeout=2) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}")
            try:
                if (await client.get(f"{base}/health")).status_code < 500:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError("server did not start")


async def _measure(
    command: list[str], env: dict[str, str], seconds: int, connections: int, work: Path
) -> dict[str, Any]:
    port = _free_port()
    process = subprocess.Popen([*command, "--port", str(port)], env=env, cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    try:
        await _wait_healthy(base, process)
        post = work / "post.lua"
        post.write_text(
            f'wrk.method = "POST"\nwrk.body = {json.dumps(BODY)}\nwrk.headers["Content-Type"] = "application/json"\n'
        )
        async with httpx.AsyncClient(timeout=10) as client:
            job_id = (
                await client.post(f"{base}/jobs", content=BODY, headers={"content-type": "application/json"})
            ).json()["id"]
        posts = await asyncio.to_thread(_wrk, f"{base}/jobs", seconds, connections, post)
        gets = await asyncio.to_thread(_wrk, f"{base}/jobs/{job_id}", seconds, connections, None)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)
    return {"post_per_s": round(posts, 1), "get_per_s": round(gets, 1)}


async def _one_run(options: argparse.Namespace, base_env: dict[str, str], work: Path, run: int) -> dict[str, Any]:
    """The bare app, then Conveyor on SQLite and on PostgreSQL (each on a fresh database), back to back."""
    bare = [sys.executable, "-m", "uvicorn", "benchmarks.bare_api:app", "--no-access-log", "--log-level", "warning"]
    figures = {"bare_fastapi": await _measure(bare, base_env, options.seconds, options.connections, work)}
    serve = [
        sys.executable,
        "-m",
        "conveyor",
        "serve",
        "--app",
        "benchmarks.tasks:app",
        "--no-worker",
        "--no-access-log",
    ]
    sqlite_env = {**base_env, "CONVEYOR_DATABASE_URL": f"sqlite:///{work / f'http-{run}.db'}"}
    figures["conveyor_sqlite"] = await _measure(serve, sqlite_env, options.seconds, options.connections, work)
    name = f"conveyor_http_{os.getpid()}_{run}"
    connection = await asyncpg.connect(SERVER)
    await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await connection.execute(f'CREATE DATABASE "{name}"')
    pg_env = {
        **base_env,
        "CONVEYOR_DATABASE_URL": SERVER.rsplit("/", 1)[0] + f"/{name}",
        "CONVEYOR_AUTO_MIGRATE": "true",
    }
    try:
        figures["conveyor_postgresql"] = await _measure(serve, pg_env, options.seconds, options.connections, work)
    finally:
        await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await connection.close()
    # Each ratio within its own run: the bare app measured a minute before, not runs apart.
    floor = figures["bare_fastapi"]
    for key in ("conveyor_sqlite", "conveyor_postgresql"):
        figures[key]["post_vs_bare"] = round(figures[key]["post_per_s"] / floor["post_per_s"], 3)
        figures[key]["get_vs_bare"] = round(figures[key]["get_per_s"] / floor["get_per_s"], 3)
    return figures


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--runs", type=int, default=3, help="runs of all three servers; figures are medians")
    options = parser.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed (Debian: apt-get install wrk)")
    base_env = {**os.environ, "PYTHONPATH": str(ROOT), "CONVEYOR_LOG_LEVEL": "WARNING"}
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as folder:
        for run in range(1, options.runs + 1):
            runs.append(await _one_run(options, base_env, Path(folder), run))
            print(f"[run {run}/{options.runs}] {json.dumps(runs[-1])}", flush=True)
    results: dict[str, Any] = {
        "benchmark": "W4 HTTP",
        "seconds": options.seconds,
        "connections": options.connections,
        # Median (min, max) of the runs, per server and figure.
        "summary": {
            server: {metric: summarize([run[server][metric] for run in runs]) for metric in runs[0][server]}
            for server in runs[0]
        },
        "runs": runs,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "http.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["summary"], indent=2))


if __name__ == "__main__":
    asyncio.run(main())
