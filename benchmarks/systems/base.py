"""What every benchmarked system implements, and the harness pieces they share.

A system supplies four small things: fresh storage (``prepare``/``cleanup``), enqueueing
(``enqueue_noops`` in bulk where it has a bulk API, ``enqueue_noop`` one at a time, and
``enqueue_sleeps``), and the command line of its worker for each profile (``worker_spec``).
The workloads themselves (``run_w1``, ``run_w2``, ``run_w3``) are written once, here, so every
system is timed by the same code:

- completion is the task's own side effect: each task appends one byte to a file
  (:mod:`benchmarks.systems.sink`), and the harness reads the file's size;
- workers are separate OS processes, started by the harness in their own process group under
  coreutils ``timeout``, stopped with SIGTERM and, past a grace period, SIGKILL to the group.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import gc
import importlib.metadata
import itertools
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, ClassVar

ROOT = Path(__file__).resolve().parents[2]
BULK_CHUNK = 1_000
"""Jobs per call of a bulk enqueue API (and per batch of the raw-SQL floor)."""
CONCURRENT_ENQUEUES = 100
"""In-flight enqueues for async clients that have no bulk API."""
WORKER_LIFETIME_S = 900
"""Hard limit on any worker process, enforced by coreutils ``timeout``."""
STOP_GRACE_S = 15.0
"""SIGTERM, then this long, then SIGKILL to the whole process group."""
WARM_JOBS = 10
"""Jobs run one at a time before W2 measures, so connections and code paths are warm."""
SETTLE_S = 1.0
"""Pause after warming, so every worker process is up and idle before a timed workload."""


class NotApplicableError(Exception):
    """This workload does not apply to this system (e.g. the raw-SQL floor has no latency run)."""


class UnavailableError(Exception):
    """The system cannot run here at all (e.g. its package does not install on this Python)."""


class WorkerDiedError(RuntimeError):
    """A worker process exited while the harness still needed it."""


@dataclass(frozen=True, slots=True)
class Env:
    """Where a run happens: a scratch directory and the servers to use."""

    run_dir: Path
    redis_server: str = "redis://127.0.0.1:6379"
    postgres_server: str = "postgresql://postgres@127.0.0.1:5432/postgres"
    timeout: float = 300.0
    """Longest any single wait (a W1 drain, a warm-up, a W3 batch) may take, in seconds; a W2 job gets 30 s."""


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """How to start a system's workers: ``processes`` copies of ``argv``, with ``env`` added."""

    argv: list[str]
    env: Mapping[str, str] = field(default_factory=dict)
    processes: int = 1


# -- processes ---------------------------------------------------------------------------

_LIVE: set[WorkerGroup] = set()
_NAMES = itertools.count(1)


def _kill_everything() -> None:
    for group in list(_LIVE):
        group.kill()


atexit.register(_kill_everything)


class WorkerGroup:
    """Worker processes of one system for one workload; always stopped, even on errors."""

    def __init__(self, spec: WorkerSpec, *, sink: Sink, log_prefix: Path) -> None:
        self.spec = spec
        self.sink = sink
        self.log_prefix = log_prefix
        self.processes: list[subprocess.Popen[bytes]] = []
        self._logs: list[IO[bytes]] = []
        self.started_at = 0.0

    def start(self) -> None:
        python_path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")]))
        env = {
            **{name: value for name, value in os.environ.items() if name != "PYTHONDONTWRITEBYTECODE"},
            "PYTHONPATH": python_path,
            "PYTHONUNBUFFERED": "1",
            # Workers start as deployed code does, from compiled bytecode: where the environment
            # forbids writing it (PYTHONDONTWRITEBYTECODE), every start compiled each module it
            # imports from source, about 1 s of a Conveyor worker's 1.9 s start-up here. The
            # cache goes to the run's scratch directory; the checkout and virtualenv stay as they were.
            "PYTHONPYCACHEPREFIX": str(self.log_prefix.parent / "pycache"),
            "BENCH_SINK": str(self.sink.path),
            **self.spec.env,
        }
        _LIVE.add(self)
        self.started_at = time.perf_counter()
        for index in range(self.spec.processes):
            log = Path(f"{self.log_prefix}-{index}.log").open("wb")  # noqa: SIM115 - closed in kill()
            self._logs.append(log)
            argv = ["timeout", "--kill-after=5", str(WORKER_LIFETIME_S), *self.spec.argv]
            self.processes.append(
                subprocess.Popen(
                    argv,
                    env=env,
                    cwd=ROOT,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )

    def check(self) -> None:
        """Raise if any worker process has exited."""
        for index, process in enumerate(self.processes):
            code = process.poll()
            if code is not None:
                raise WorkerDiedError(f"worker process {index} exited with {code}:\n{self.log_tail(index)}")

    def log_tail(self, index: int = 0, lines: int = 25) -> str:
        path = Path(f"{self.log_prefix}-{index}.log")
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """SIGTERM each process (coreutils ``timeout`` passes it to its group), then SIGKILL what is left."""
        for process in self.processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for process in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(max(0.0, deadline - time.monotonic()))
        self.kill()

    def kill(self) -> None:
        for process in self.processes:
            # start_new_session made each process the leader of its own group: pgid == pid.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(5)
        for log in self._logs:
            log.close()
        self._logs.clear()
        _LIVE.discard(self)


# -- the side effect -------------------------------------------------------------------------


class Sink:
    """The file that tasks append one byte to; its size is the number of jobs done.

    For W2 the harness waits on inotify (Linux) for the file to change, so it wakes within
    microseconds of a task's write and spends no CPU between writes. W1 and W3 need no finer clock
    than a millisecond, and there it looks at the file's size every millisecond instead: a watch
    costs each write a kernel event and the harness a wake-up, which at 30,000 writes a second
    took about 15 % off the fastest system's W1 here (Conveyor's; PgQueuer's 4 %).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        path.write_bytes(b"")

    def count(self) -> int:
        return self.path.stat().st_size

    async def wait_for(
        self, target: int, group: WorkerGroup, *, timeout: float, min_interval: float = 0.0
    ) -> tuple[float, float]:
        """Wait until ``target`` jobs are done; return when the first new one and the last were seen.

        ``min_interval``: look every so often rather than at each write (W1 and W3: 1 ms); 0
        watches the file and takes every wake-up (W2).
        """
        loop = asyncio.get_running_loop()
        changed = asyncio.Event()
        watch = None if min_interval else _Inotify.open(self.path)
        if watch is not None:
            loop.add_reader(watch.fd, lambda: (watch.drain(), changed.set()))
        start = self.count()
        first: float | None = None
        deadline = time.perf_counter() + timeout
        try:
            while True:
                done = self.count()
                now = time.perf_counter()
                if first is None and done > start:
                    first = now
                if done >= target:
                    return (first if first is not None else now), now
                if now > deadline:
                    raise TimeoutError(f"{done} of {target} jobs done after {timeout:.0f} s")
                group.check()
                if watch is None:
                    await asyncio.sleep(min_interval or 0.001)
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), 0.1)
                changed.clear()
        finally:
            if watch is not None:
                loop.remove_reader(watch.fd)
                watch.close()


class _Inotify:
    """A non-blocking inotify descriptor watching one file for writes (Linux, through libc)."""

    IN_MODIFY = 0x2
    IN_NONBLOCK = 0o4000
    IN_CLOEXEC = 0o2000000

    def __init__(self, fd: int) -> None:
        self.fd = fd

    @classmethod
    def open(cls, path: Path) -> _Inotify | None:
        if not sys.platform.startswith("linux"):
            return None
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = libc.inotify_init1(cls.IN_NONBLOCK | cls.IN_CLOEXEC)
        except (OSError, AttributeError):
            return None
        if fd < 0:
            return None
        if libc.inotify_add_watch(fd, os.fsencode(path), cls.IN_MODIFY) < 0:
            os.close(fd)
            return None
        return cls(fd)

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self.fd, 65536):
                pass

    def close(self) -> None:
        os.close(self.fd)


# -- statistics ------------------------------------------------------------------------------


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def summarize(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


# -- systems ---------------------------------------------------------------------------------


class System:
    """One queue system in one configuration. Subclasses fill in the class variables and hooks."""

    name: ClassVar[str]
    label: ClassVar[str]
    distribution: ClassVar[str]
    """The PyPI distribution whose version is reported."""
    storage: ClassVar[str]
    """"redis", "postgresql" or "sqlite"."""
    workloads: ClassVar[tuple[str, ...]] = ("w1", "w2", "w3")
    defaults: ClassVar[Mapping[str, Any]] = {}
    """Tunable knobs of the general (W1/W2) setup and their chosen values; ``--set NAME.KEY=VALUE`` overrides."""

    def __init__(self, env: Env, **options: Any) -> None:
        unknown = set(options) - set(self.defaults)
        if unknown:
            raise ValueError(f"{self.name} has no option(s) {sorted(unknown)}; it has {sorted(self.defaults)}")
        self.env = env
        self.options: dict[str, Any] = {
            key: type(value)(options[key]) if key in options else value for key, value in self.defaults.items()
        }
        self._scratch = 0

    # -- description ----------------------------------------------------------------------

    def version(self) -> str:
        return importlib.metadata.version(self.distribution)

    def configuration(self) -> dict[str, str]:
        """Per profile ("general" for W1 and W2, "io" for W3): processes, concurrency, prefetch, broker..."""
        raise NotImplementedError

    # -- storage and clients (around every workload) -----------------------------------------

    async def prepare(self) -> None:
        """Fresh storage (a new database, a flushed Redis DB) and open clients."""

    async def cleanup(self) -> None:
        """Close clients and drop the storage ``prepare`` made."""

    # -- enqueueing --------------------------------------------------------------------------

    async def enqueue_noops(self, n: int) -> None:
        raise NotImplementedError

    async def enqueue_noop(self) -> None:
        raise NotImplementedError

    async def enqueue_sleeps(self, n: int, seconds: float) -> None:
        raise NotImplementedError

    # -- workers ---------------------------------------------------------------------------

    def worker_spec(self, profile: str, concurrency: int) -> WorkerSpec:
        """``profile``: "general" (W1 and W2: the system's best setup for this machine) or "io"
        (W3: ``concurrency`` jobs at once)."""
        raise NotImplementedError

    async def wait_ready(self, group: WorkerGroup, sink: Sink, profile: str) -> None:
        """Return once the workers run jobs: one job through, then a pause for the other processes."""
        target = sink.count() + 1  # counted before the enqueue: the job may be done before it returns
        await self.enqueue_noop()
        await sink.wait_for(target, group, timeout=self.env.timeout)
        await asyncio.sleep(SETTLE_S if group.spec.processes > 1 or profile == "io" else 0.2)

    def scratch(self, label: str) -> Path:
        self._scratch += 1
        return self.env.run_dir / f"{self.name}-{label}-{self._scratch}"

    @contextlib.asynccontextmanager
    async def workers(self, profile: str, sink: Sink, *, concurrency: int = 0) -> AsyncGenerator[WorkerGroup]:
        group = WorkerGroup(self.worker_spec(profile, concurrency), sink=sink, log_prefix=self.scratch(profile))
        try:
            group.start()
            yield group
        finally:
            group.stop()

    # -- the workloads, the same for every system ---------------------------------------------

    async def measure(self, workload: str, **params: Any) -> dict[str, Any]:
        """Run one workload on fresh storage."""
        if workload not in self.workloads:
            raise NotApplicableError(f"{self.label} does not run {workload}")
        await self.prepare()
        # The harness's heap (its own modules, every system loaded so far) is set aside for the
        # run, as `conveyor serve` and the bare FastAPI app do with theirs at start-up: a full
        # collection during a run then walks what this run allocated, not some 100,000 objects
        # that predate it (about 40 ms here, a third of a 10,000-job bulk enqueue).
        gc.collect()
        gc.freeze()
        try:
            return await getattr(self, f"run_{workload}")(**params)
        finally:
            gc.unfreeze()
            await self.cleanup()

    async def run_w1(self, jobs: int) -> dict[str, Any]:
        """Throughput: enqueue ``jobs`` no-ops, then start workers and time them until the last is done."""
        sink = Sink(self.scratch("w1-sink"))
        started = time.perf_counter()
        await self.enqueue_noops(jobs)
        enqueue_s = time.perf_counter() - started
        async with self.workers("general", sink) as group:
            first, last = await sink.wait_for(jobs, group, timeout=self.env.timeout, min_interval=0.001)
            await asyncio.sleep(0.5)
            extra = sink.count() - jobs
        if extra:
            raise RuntimeError(f"{extra} jobs ran more than once")
        return {
            "enqueue_per_s": jobs / enqueue_s,
            "process_per_s": (jobs - 1) / max(last - first, 0.001),
            "startup_s": first - group.started_at,
            "drain_s": last - first,
        }

    async def run_w2(self, n: int) -> dict[str, Any]:
        """Latency: an idle, warmed worker; ``n`` jobs one at a time, each awaited before the next."""
        sink = Sink(self.scratch("w2-sink"))
        async with self.workers("general", sink) as group:
            await self.wait_ready(group, sink, "general")
            for _ in range(WARM_JOBS):
                target = sink.count() + 1
                await self.enqueue_noop()
                await sink.wait_for(target, group, timeout=self.env.timeout)
            latencies = []
            for _ in range(n):
                target = sink.count() + 1
                started = time.perf_counter()
                await self.enqueue_noop()
                _, done = await sink.wait_for(target, group, timeout=min(self.env.timeout, 30))
                latencies.append((done - started) * 1000)
        return {
            "p50_ms": statistics.median(latencies),
            "p99_ms": percentile(latencies, 0.99),
            "min_ms": min(latencies),
            "max_ms": max(latencies),
        }

    async def run_w3(self, jobs: int, concurrency: int, seconds: float = 0.05) -> dict[str, Any]:
        """I/O concurrency: ``jobs`` tasks that sleep ``seconds``, ``concurrency`` at a time, workers warm."""
        sink = Sink(self.scratch("w3-sink"))
        async with self.workers("io", sink, concurrency=concurrency) as group:
            await self.wait_ready(group, sink, "io")
            target = sink.count() + jobs
            started = time.perf_counter()
            await self.enqueue_sleeps(jobs, seconds)
            enqueued = time.perf_counter()
            _, last = await sink.wait_for(target, group, timeout=self.env.timeout, min_interval=0.001)
        ideal = jobs / concurrency * seconds
        return {
            "wall_s": last - started,
            "enqueue_s": enqueued - started,
            "ideal_s": ideal,
            "vs_ideal": (last - started) / ideal,
        }


# -- storage helpers -------------------------------------------------------------------------


class PostgresSystem(System):
    """A system on a fresh PostgreSQL database per workload, dropped after."""

    storage = "postgresql"

    def __init__(self, env: Env, **options: Any) -> None:
        super().__init__(env, **options)
        self.database: str | None = None

    @property
    def dsn(self) -> str:
        assert self.database is not None, "prepare() first"
        return self.env.postgres_server.rsplit("/", 1)[0] + f"/{self.database}"

    async def _admin(self, sql: str) -> None:
        import asyncpg  # noqa: PLC0415 - only PostgreSQL systems need it

        connection = await asyncpg.connect(self.env.postgres_server, timeout=10)
        try:
            await connection.execute(sql)
        finally:
            await connection.close()

    async def prepare(self) -> None:
        self.database = f"bench_{self.name}_{os.getpid()}_{next(_NAMES)}"
        await self._admin(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
        await self._admin(f'CREATE DATABASE "{self.database}"')

    async def cleanup(self) -> None:
        if self.database is not None:
            await self._admin(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
            self.database = None


class RedisSystem(System):
    """A system on its own Redis DB number, flushed before and after every workload."""

    storage = "redis"
    redis_db: ClassVar[int]

    @property
    def redis_url(self) -> str:
        return f"{self.env.redis_server}/{self.redis_db}"

    def _flush(self) -> None:
        import redis  # noqa: PLC0415 - only Redis systems need it

        client = redis.Redis.from_url(self.redis_url, socket_timeout=10)
        try:
            client.flushdb()
        finally:
            client.close()

    async def prepare(self) -> None:
        self._flush()

    async def cleanup(self) -> None:
        self._flush()


def python_module(module: str, *args: str) -> list[str]:
    """``python -m module args...`` with this interpreter (the project's virtual environment)."""
    return [sys.executable, "-m", module, *args]
