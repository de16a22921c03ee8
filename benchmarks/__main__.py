"""Conveyor side by side with its Python peers: one command, one run, ratios to Conveyor-on-PostgreSQL.

    uv run --group bench python -m benchmarks                 # the full run (about 20 minutes)
    uv run --group bench python -m benchmarks --quick         # a smoke run of every system (~3 minutes)
    uv run --group bench python -m benchmarks --only conveyor_postgres,celery_redis --runs 1
    uv run --group bench python -m benchmarks --report        # redraw docs from results.json

A manual command: it needs PostgreSQL (127.0.0.1:5432, user postgres) and Redis (127.0.0.1:6379)
and the ``bench`` dependency group, and it never runs in CI. Every system gets a fresh PostgreSQL
database or a flushed Redis DB of its own for every workload of every run; workers are separate
OS processes started by the harness, each bounded in time, stopped with SIGTERM and then SIGKILL.

Workloads, identical for every system (see ``benchmarks/systems/base.py``):

- W1 throughput: ``--jobs`` no-op jobs enqueued (bulk API where the system has one), then workers
  start; jobs/s from the first job done to the last, counted by the tasks' own side effect.
- W2 latency: an idle, warmed worker; ``--latency-jobs`` jobs one at a time, each awaited before
  the next; enqueue-to-completion p50 and p99.
- W3 I/O concurrency: ``--io-jobs`` jobs that each sleep 50 ms, ``--io-concurrency`` at a time;
  wall time (from the first enqueue to the last job done) against the ideal.
- W5 scaling: W1 on Conveyor-on-PostgreSQL with 1, 2, 3 and 4 worker processes.
- The floor: W1's cycle in raw SQL (asyncpg, SKIP LOCKED; sqlite3), the storage limit.
- W4 (HTTP) is measured separately; ``EXTRA_WORKLOADS`` below is its hook.

Each figure is the median of ``--runs`` runs, with min and max. Results go to
``benchmarks/results/results.json``; ``docs/benchmarks.md`` (tables) and ``docs/benchmarks.png``
(chart) are generated from it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks import report
from benchmarks.systems import REFERENCE, SYSTEMS, load
from benchmarks.systems.base import Env, NotApplicableError, System, UnavailableError, summarize

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "results.json"
SCALING_PROCESSES = (1, 2, 3, 4)
QUIET_LOAD = 0.5

EXTRA_WORKLOADS: dict[str, Callable[[System, argparse.Namespace], Awaitable[dict[str, Any]]]] = {}
"""Hook for workloads measured outside this harness's three (W4, HTTP): name -> coroutine taking a
prepared system and the options, returning ``{metric: value}``. Results land beside W1-W3 and
the report renders any workload it does not know as a plain table."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3, help="runs of everything; figures are medians (default 3)")
    parser.add_argument("--jobs", type=int, default=10_000, help="W1 and W5 jobs (default 10000)")
    parser.add_argument("--latency-jobs", type=int, default=300, help="W2 jobs (default 300)")
    parser.add_argument("--io-jobs", type=int, default=2_000, help="W3 jobs (default 2000)")
    parser.add_argument("--io-concurrency", type=int, default=100, help="W3 jobs at once (default 100)")
    parser.add_argument("--only", default="", help=f"comma-separated systems: {','.join(SYSTEMS)}")
    parser.add_argument("--skip", default="", help="comma-separated systems to leave out")
    parser.add_argument("--workloads", default="w1,w2,w3,w5", help="comma-separated (default w1,w2,w3,w5)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SYSTEM.KEY=VALUE",
        help="override a system's general setup, e.g. celery_redis.pool=solo (repeatable)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: 1 run, 500/30/200 jobs, results to results-quick.json and no docs",
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="longest single wait, seconds (default 300)")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379", help="Redis server (loopback)")
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/postgres", help="PostgreSQL")
    parser.add_argument("--output", type=Path, default=None, help=f"results JSON (default {RESULTS})")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.{md,png}")
    parser.add_argument("--report", action="store_true", help="only regenerate the docs from --output")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (logs, sinks)")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="first wait up to this long for the 1-minute load average to fall below 0.5 (other work skews results)",
    )
    options = parser.parse_args(argv)
    if options.quick:
        options.runs, options.jobs, options.latency_jobs, options.io_jobs = 1, 500, 30, 200
        options.no_docs = options.no_docs or not options.report
    if options.output is None:
        options.output = RESULTS.with_name("results-quick.json") if options.quick else RESULTS
    names = [name for name in (options.only.split(",") if options.only else SYSTEMS) if name]
    skipped = {name for name in options.skip.split(",") if name}
    unknown = (set(names) | skipped) - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown system(s) {sorted(unknown)}; known: {', '.join(SYSTEMS)}")
    options.systems = [name for name in names if name not in skipped]
    options.workload_list = [name for name in options.workloads.split(",") if name]
    options.settings = _overrides(parser, options.overrides)
    if options.runs < 1 or options.jobs < 2 or options.latency_jobs < 1 or options.io_jobs < 1:
        parser.error("--runs, --jobs, --latency-jobs and --io-jobs must be positive (--jobs at least 2)")
    return options


def _overrides(parser: argparse.ArgumentParser, given: list[str]) -> dict[str, dict[str, str]]:
    settings: dict[str, dict[str, str]] = {}
    for item in given:
        target, _, value = item.partition("=")
        system, _, key = target.partition(".")
        if not value or not key or system not in SYSTEMS:
            parser.error(f"--set {item!r}: expected SYSTEM.KEY=VALUE with SYSTEM one of {', '.join(SYSTEMS)}")
        settings.setdefault(system, {})[key] = value
    return settings


# -- the machine -----------------------------------------------------------------------------


def _meminfo_gib() -> float | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    return None


def _git_commit() -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "src"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
        return commit + ("+uncommitted changes in src" if dirty else "")
    return None


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


async def machine(options: argparse.Namespace) -> dict[str, Any]:
    import asyncpg  # noqa: PLC0415 - Conveyor's own dependency
    import redis  # noqa: PLC0415 - bench group

    info: dict[str, Any] = {
        "cores": os.cpu_count(),
        "ram_gib": _meminfo_gib(),
        "cpu": _cpu_model(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    with contextlib.suppress(Exception):
        connection = await asyncpg.connect(options.postgres, timeout=10)
        try:
            info["postgresql"] = await connection.fetchval("SHOW server_version")
            info["postgresql_settings"] = {
                name: await connection.fetchval(f"SHOW {name}")
                for name in ("synchronous_commit", "fsync", "shared_buffers", "max_connections")
            }
        finally:
            await connection.close()
    with contextlib.suppress(Exception):
        client = redis.Redis.from_url(options.redis, socket_timeout=10)
        try:
            server: Any = client.info("server")
            persistence: Any = client.config_get("appendonly")
            info["redis"] = server.get("redis_version")
            info["redis_settings"] = {"appendonly": persistence.get("appendonly")}
        finally:
            client.close()
    import sqlite3  # noqa: PLC0415

    info["sqlite"] = sqlite3.sqlite_version
    return info


# -- running ---------------------------------------------------------------------------------


def _params(workload: str, options: argparse.Namespace) -> dict[str, Any]:
    if workload == "w1":
        return {"jobs": options.jobs}
    if workload == "w2":
        return {"n": options.latency_jobs}
    if workload == "w3":
        return {"jobs": options.io_jobs, "concurrency": options.io_concurrency}
    return {}


def _describe(workload: str, figures: dict[str, Any]) -> str:
    if workload in {"w1", "w5"}:
        return f"enqueue {figures['enqueue_per_s']:,.0f}/s, process {figures['process_per_s']:,.0f}/s"
    if workload == "w2":
        return f"p50 {figures['p50_ms']:.2f} ms, p99 {figures['p99_ms']:.2f} ms"
    if workload == "w3":
        return f"wall {figures['wall_s']:.2f} s (ideal {figures['ideal_s']:.2f} s)"
    return json.dumps(figures)


def _short_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) < 2_000 else text[:2_000] + " ..."


async def _measure(system: System, workload: str, options: argparse.Namespace) -> dict[str, Any]:
    if workload in EXTRA_WORKLOADS:
        await system.prepare()
        try:
            return await EXTRA_WORKLOADS[workload](system, options)
        finally:
            await system.cleanup()
    return await system.measure(workload, **_params(workload, options))


def _entry(results: dict[str, Any], name: str, system: System) -> dict[str, Any]:
    entry = results["systems"].get(name)
    if entry is None:
        entry = {"label": system.label, "storage": system.storage, "options": dict(system.options), "workloads": {}}
        try:
            entry["version"] = system.version()
            entry["configuration"] = system.configuration()
        except UnavailableError as exc:
            entry["unavailable"] = str(exc)
        results["systems"][name] = entry
    return entry


def _record(slot: dict[str, Any], figures: dict[str, Any] | None, error: str | None) -> None:
    if figures is not None:
        slot.setdefault("runs", []).append(figures)
        metrics = slot["runs"][0].keys()
        slot["summary"] = {metric: summarize([run[metric] for run in slot["runs"]]) for metric in metrics}
    if error is not None:
        slot.setdefault("errors", []).append(error)


async def run_all(options: argparse.Namespace, env: Env, results: dict[str, Any]) -> None:
    workloads = [name for name in options.workload_list if name != "w5"]
    for run in range(1, options.runs + 1):
        for name in options.systems:
            system = load(name)(env, **options.settings.get(name, {}))
            entry = _entry(results, name, system)
            if "unavailable" in entry:
                if run == 1:
                    print(f"[run {run}/{options.runs}] {name}: unavailable: {entry['unavailable']}", flush=True)
                continue
            for workload in workloads:
                if workload not in system.workloads and workload not in EXTRA_WORKLOADS:
                    continue
                started = time.monotonic()
                slot = entry["workloads"].setdefault(workload, {})
                try:
                    figures = await _measure(system, workload, options)
                except NotApplicableError:
                    continue
                except Exception as exc:  # noqa: BLE001 - one failing system must not stop the others
                    _record(slot, None, _short_error(exc))
                    print(f"[run {run}/{options.runs}] {name} {workload}: FAILED {_short_error(exc)}", flush=True)
                    continue
                _record(slot, figures, None)
                took = time.monotonic() - started
                print(f"[run {run}/{options.runs}] {name} {workload}: {_describe(workload, figures)} ({took:.1f} s)")
                sys.stdout.flush()
        if "w5" in options.workload_list and REFERENCE in options.systems:
            await run_scaling(options, env, results, run)
        _save(results, options.output)


async def run_scaling(options: argparse.Namespace, env: Env, results: dict[str, Any], run: int) -> None:
    scaling = results.setdefault("w5", {"system": REFERENCE, "processes": {}})
    for processes in SCALING_PROCESSES:
        settings = {**options.settings.get(REFERENCE, {}), "processes": processes}
        system = load(REFERENCE)(env, **settings)
        slot = scaling["processes"].setdefault(str(processes), {"configuration": system.configuration()["general"]})
        try:
            figures = await system.measure("w1", jobs=options.jobs)
        except Exception as exc:  # noqa: BLE001 - report and go on
            _record(slot, None, _short_error(exc))
            print(f"[run {run}/{options.runs}] w5 x{processes}: FAILED {_short_error(exc)}", flush=True)
            continue
        _record(slot, figures, None)
        print(f"[run {run}/{options.runs}] w5 {processes} process(es): {_describe('w5', figures)}", flush=True)


def _save(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_suffix(".json.tmp")
    scratch.write_text(json.dumps(results, indent=2) + "\n")
    scratch.replace(path)


async def wait_quiet(seconds: float) -> None:
    for _ in range(int(seconds // 5)):
        if os.getloadavg()[0] < QUIET_LOAD:
            break
        await asyncio.sleep(5)
    load = os.getloadavg()[0]
    if load >= QUIET_LOAD:
        print(f"warning: 1-minute load average is {load:.2f}: other work on this machine will skew the figures")


async def main(options: argparse.Namespace) -> int:
    if options.report:
        report.write_docs(json.loads(options.output.read_text()), ROOT)
        print(f"wrote {report.MARKDOWN} and {report.CHART} from {options.output}")
        return 0
    await wait_quiet(options.wait_quiet)
    run_dir = Path(tempfile.mkdtemp(prefix="conveyor-bench-"))
    env = Env(run_dir=run_dir, redis_server=options.redis, postgres_server=options.postgres, timeout=options.timeout)
    results: dict[str, Any] = {
        "benchmark": "Conveyor and its Python peers: throughput (W1), latency (W2), I/O concurrency (W3), scaling (W5)",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python -m benchmarks", *sys.argv[1:]]),
        "options": {
            "runs": options.runs,
            "jobs": options.jobs,
            "latency_jobs": options.latency_jobs,
            "io_jobs": options.io_jobs,
            "io_concurrency": options.io_concurrency,
            "io_sleep_s": 0.05,
            "quick": options.quick,
        },
        "reference": REFERENCE,
        "conveyor_commit": _git_commit(),
        "machine": {**await machine(options), "load_average_at_start": os.getloadavg()},
        "systems": {},
        "w4": None,
    }
    started = time.monotonic()
    status = 0
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        await run_all(options, env, results)
    except asyncio.CancelledError:  # Ctrl-C or SIGTERM: every worker group has been stopped on the way out
        results["interrupted"] = True
        print("interrupted: workers stopped; partial results saved", file=sys.stderr)
        status = 130
    finally:
        results["wall_s"] = round(time.monotonic() - started, 1)
        results["machine"]["load_average_at_end"] = os.getloadavg()
        results["conveyor_commit_at_end"] = _git_commit()
        _save(results, options.output)
        failed = any(
            slot.get("errors") for entry in results["systems"].values() for slot in entry["workloads"].values()
        )
        if options.keep or failed:
            print(f"scratch directory (worker logs, sinks): {run_dir}")
        else:
            shutil.rmtree(run_dir, ignore_errors=True)
    if not options.no_docs and not results.get("interrupted"):
        report.write_docs(results, ROOT)
        print(f"wrote {options.output}, {report.MARKDOWN} and {report.CHART} in {results['wall_s']:.0f} s")
    return status


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main(parse_args())))
    except KeyboardInterrupt:
        sys.exit(130)
