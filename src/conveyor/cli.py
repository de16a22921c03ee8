"""The ``conveyor`` command. Crosses into async once per command, at this edge.

Exit codes: 0 done; 1 the awaited job failed (dead or cancelled) or was not finished in time;
2 bad input (usage, unknown task, bad arguments, bad settings); 3 no such job, or its state
does not allow the operation; 4 the database failed or its schema does not fit.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import importlib
import ipaddress
import os
import signal
import socket
import sys
import traceback
from collections.abc import Callable, Coroutine, Generator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click
import orjson
import structlog
import uvicorn
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table

from conveyor.app import Conveyor
from conveyor.errors import (
    ConfigError,
    ConveyorError,
    JobNotFoundError,
    JobStateError,
    StorageError,
    TaskError,
    WorkflowNotFoundError,
)
from conveyor.jobs import Job, JobState, TokenRecord
from conveyor.log import configure_logging
from conveyor.metrics import CONTENT_TYPE
from conveyor.schedules import ScheduleStatus
from conveyor.tokens import NewToken, Scope, create_token
from conveyor.tracing import configure_tracing
from conveyor.workflows import Workflow, WorkflowState

if TYPE_CHECKING:
    from conveyor.engine.processes import ListeningTurn

T = TypeVar("T")
R = TypeVar("R")

EXIT_JOB_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_CONFLICT = 3
EXIT_STORAGE = 4

console = Console()
errors = Console(stderr=True)


def _fail(message: str, code: int) -> NoReturn:
    errors.print(f"[bold red]error:[/] {escape(message)}", highlight=False, markup=True)
    sys.exit(code)


def _exit_code(exc: ConveyorError) -> int:
    if isinstance(exc, (ConfigError, TaskError)):
        return EXIT_BAD_INPUT
    if isinstance(exc, (JobNotFoundError, WorkflowNotFoundError, JobStateError)):
        return EXIT_CONFLICT
    if isinstance(exc, StorageError):
        return EXIT_STORAGE
    return EXIT_JOB_FAILED


MAX_PORT = 65_535

# The collector's youngest generation, for a long-running command once started (CPython's default: 700).
GC_YOUNG_THRESHOLD = 10_000


def settle_heap() -> None:
    """Set the garbage collector up for a long-running command whose start-up is done.

    By default CPython collects young objects every 700 allocations, and every so often walks
    every object it tracks: in a worker or server that is the whole import graph (SQLAlchemy,
    pydantic, asyncpg, hundreds of thousands of objects alive as long as the process), walked
    again and again for the few cycles each job leaves. Freezing what start-up made takes it out
    of those walks, and a larger young generation lets a batch of jobs' short-lived objects die
    by reference count before any collection runs. Measured on no-op drains: about 6 % less
    worker CPU per job. Not done for an embedded worker: the host application owns its collector.
    """
    gc.collect()
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, oldest)


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    try:
        return asyncio.run(coro)
    except ConveyorError as exc:
        _fail(str(exc), _exit_code(exc))


def load_app(reference: str | None) -> Conveyor:
    """Import ``module:attribute`` (attribute defaults to ``app``) and check it is a Conveyor."""
    if not reference:
        try:
            app = Conveyor()
        except ConfigError as exc:
            _fail(str(exc), EXIT_BAD_INPUT)
        if not app.settings.app:
            return app
        # CONVEYOR_APP set in .env (the real environment already reached --app through Click).
        reference = app.settings.app
    module_name, _, attribute = reference.partition(":")
    # Like uvicorn and celery: the app module usually lives in the directory the command runs in.
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        target: Any = importlib.import_module(module_name)
    except ConfigError as exc:
        _fail(str(exc), EXIT_BAD_INPUT)
    except ImportError as exc:
        _fail(f"cannot import {module_name!r} (from --app {reference!r}): {exc}", EXIT_BAD_INPUT)
    except Exception as exc:  # noqa: BLE001 - the app's own code failed: bad input (2), not a failed job (1)
        traceback.print_exc()
        _fail(f"cannot import {module_name!r} (from --app {reference!r}): {type(exc).__name__}: {exc}", EXIT_BAD_INPUT)
    for part in (attribute or "app").split("."):
        if not hasattr(target, part):
            _fail(f"{module_name!r} has no attribute {part!r} (from --app {reference!r})", EXIT_BAD_INPUT)
        target = getattr(target, part)
    if not isinstance(target, Conveyor):
        _fail(f"--app {reference!r} is a {type(target).__name__}, not a Conveyor app", EXIT_BAD_INPUT)
    return target


def _parse_json(value: str | None, expected: type, option: str) -> Any:
    if value is None:
        return expected()
    try:
        parsed = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise click.BadParameter(f"not valid JSON: {exc}", param_hint=option) from None
    if not isinstance(parsed, expected):
        example = "an array, e.g. [1, 2]" if expected is list else 'an object, e.g. {"a": 1}'
        raise click.BadParameter(f"must be {example}", param_hint=option)
    return parsed


def _emit_json(data: Any) -> None:
    click.echo(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())


def _when(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if value else "-"


_STATE_STYLE = {
    JobState.SUCCEEDED: "green",
    JobState.DEAD: "red",
    JobState.CANCELLED: "yellow",
    JobState.RUNNING: "cyan",
    JobState.RETRYING: "magenta",
}


def _jobs_table(jobs: list[Job], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    # Ids stay whole on one line, so they can be copied into the next command.
    table.add_column("id", no_wrap=True)
    for column in ("task", "queue", "state", "attempt", "run at", "error"):
        table.add_column(column, overflow="fold")
    for job in jobs:
        style = _STATE_STYLE.get(job.state, "")
        error = f"{job.error.type}: {job.error.message}" if job.error else ""
        table.add_row(
            job.id,
            escape(job.task),
            escape(job.queue),
            f"[{style}]{job.state}[/]" if style else job.state.value,
            f"{job.attempt}/{job.max_attempts}",
            _when(job.run_at),
            escape(error[:80]),
        )
    return table


def _show_job(job: Job) -> None:
    table = Table(show_header=False, title=f"job {job.id}", title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    rows = {
        "task": job.task,
        "queue": job.queue,
        "state": job.state.value,
        "attempt": f"{job.attempt}/{job.max_attempts}",
        "args": orjson.dumps(job.args).decode(),
        "kwargs": orjson.dumps(job.kwargs).decode(),
        "created": _when(job.created_at),
        "run at": _when(job.run_at),
        "finished": _when(job.finished_at),
        "result": orjson.dumps(job.result).decode() if job.state is JobState.SUCCEEDED else "-",
        "error": f"{job.error.type}: {job.error.message}" if job.error else "-",
        "progress": _progress_text(job.progress),
        "correlation id": job.correlation_id or "-",
    }
    for key, value in rows.items():
        table.add_row(key, escape(value))
    console.print(table)
    if job.history:
        history = Table(title="attempts", title_justify="left")
        for column in ("#", "outcome", "worker", "started", "ended", "error"):
            history.add_column(column, overflow="fold")
        for record in job.history:
            error = f"{record.error.type}: {record.error.message}" if record.error else ""
            history.add_row(
                str(record.attempt),
                record.outcome.value,
                escape(record.worker or "-"),
                _when(record.started_at),
                _when(record.ended_at),
                escape(error[:80]),
            )
        console.print(history)


def _progress_text(progress: dict[str, Any] | None) -> str:
    if not progress:
        return "-"
    message = f" {progress['message']}" if progress.get("message") else ""
    return f"{progress['fraction']:.0%}{message}"


def _finish_with(job: Job, as_json: bool) -> None:
    if as_json:
        _emit_json(job.to_json())
    else:
        _show_job(job)
    if job.state in (JobState.DEAD, JobState.CANCELLED) or not job.finished:
        sys.exit(EXIT_JOB_FAILED)


def _wait_for(app: Conveyor, job_id: str, timeout: float | None, as_json: bool) -> Job:
    async def wait() -> Job:
        try:
            return await app.wait_for_job(job_id, timeout=timeout)
        finally:
            await app.close()

    if as_json or not console.is_terminal:
        return run_async(wait())
    with console.status(f"waiting for job {escape(job_id)}"):
        return run_async(wait())


APP_OPTION = click.option(
    "--app",
    "app_ref",
    envvar="CONVEYOR_APP",
    metavar="MODULE:ATTR",
    help="The Conveyor app whose tasks to use (env CONVEYOR_APP).",
)
JSON_OPTION = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")


def _with_app(command: Callable[..., R]) -> Callable[..., R]:
    @functools.wraps(command)
    def wrapper(*args: Any, app_ref: str | None, **kwargs: Any) -> R:
        return command(*args, app=load_app(app_ref), **kwargs)

    return APP_OPTION(wrapper)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="conveyor")
@click.option(
    "--database-url",
    envvar="CONVEYOR_DATABASE_URL",
    help="sqlite:///path.db or postgresql://user@host/db (env CONVEYOR_DATABASE_URL).",
)
def cli(database_url: str | None) -> None:
    """Conveyor: durable background jobs."""
    if database_url:
        # Apps read settings from the environment when their module is imported, after this.
        os.environ["CONVEYOR_DATABASE_URL"] = database_url


@cli.command()
@_with_app
@click.option("--queues", "-q", help="Comma-separated queues to take jobs from (default: setting).")
@click.option("--concurrency", "-c", type=click.IntRange(1, 10_000), help="Jobs run at once (default: setting).")
@click.option(
    "--processes",
    "-p",
    type=click.IntRange(1, 256),
    default=1,
    show_default=True,
    envvar="CONVEYOR_WORKER_PROCESSES",
    help="Worker processes, forked from this one and supervised by it; concurrency is per process "
    "(env CONVEYOR_WORKER_PROCESSES).",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, MAX_PORT),
    help="Serve Prometheus metrics on this port (with --processes, worker N on this port + N).",
)
@click.option("--metrics-host", default="127.0.0.1", show_default=True, help="Address for --metrics-port.")
@click.option(
    "--schedules/--no-schedules",
    default=None,
    help="Enqueue the ticks of periodic tasks on these queues (default: on; CONVEYOR_SCHEDULES_ENABLED).",
)
def worker(
    app: Conveyor,
    queues: str | None,
    concurrency: int | None,
    processes: int,
    metrics_port: int | None,
    metrics_host: str,
    schedules: bool | None,
) -> None:
    """Run jobs until SIGTERM/SIGINT (a second signal stops at once)."""
    queue_list = [name.strip() for name in queues.split(",") if name.strip()] if queues else None
    if queues is not None and not queue_list:
        raise click.BadParameter("give at least one queue name", param_hint="--queues")
    if not app.tasks:
        # It would claim jobs only to fail them as unknown tasks.
        _fail("the app has no tasks: point --app (or CONVEYOR_APP) at the module that defines them", EXIT_BAD_INPUT)
    if metrics_port is not None and metrics_port + processes - 1 > MAX_PORT:
        raise click.BadParameter(
            f"worker {processes - 1} would serve on {metrics_port + processes - 1}, past {MAX_PORT}",
            param_hint="--metrics-port",
        )
    configure_logging(app.settings)
    run = functools.partial(
        _run_worker,
        app,
        queues=queue_list,
        concurrency=concurrency,
        schedules=schedules,
        metrics_host=metrics_host,
    )
    if processes == 1:
        run(metrics_port=metrics_port)
        return
    if not hasattr(os, "fork"):
        _fail("--processes needs fork(), which this platform lacks: start one worker per process", EXIT_BAD_INPUT)
    from conveyor.engine.processes import ListeningTurn, Supervisor  # noqa: PLC0415 - only this command forks

    _load_worker_modules(app)

    turn = None if app.settings.is_sqlite else ListeningTurn()

    def run_forked(index: int, control: int) -> int:
        run(metrics_port=None if metrics_port is None else metrics_port + index, control=control, turn=turn)
        return 0

    try:
        code = Supervisor(processes, run_forked, turn=turn).run()
    finally:
        if turn is not None:
            turn.close()
    sys.exit(code)


def _load_worker_modules(app: Conveyor) -> None:
    """Import what a worker imports as it starts, so that forked workers find it loaded."""
    from conveyor.engine import worker  # noqa: F401, PLC0415
    from conveyor.storage import dialects, sql  # noqa: F401, PLC0415

    if not app.settings.is_sqlite:
        from sqlalchemy.dialects.postgresql import asyncpg  # noqa: F401, PLC0415

        from conveyor.storage import postgres  # noqa: F401, PLC0415


def _run_worker(
    app: Conveyor,
    *,
    queues: list[str] | None,
    concurrency: int | None,
    schedules: bool | None,
    metrics_host: str,
    metrics_port: int | None,
    control: int | None = None,
    turn: ListeningTurn | None = None,
) -> None:
    """One worker process, until stopped.

    In a forked worker: ``control`` is the supervisor's pipe, ``turn`` the workers' listening turn.
    """
    from conveyor.engine.worker import Worker, threads_still_running  # noqa: PLC0415 - only this command runs jobs

    # Here, in the process that runs jobs: an exporter's thread would not survive a fork.
    configure_tracing(app.settings)

    async def run() -> None:
        metrics_server = None
        if metrics_port is not None:
            config = uvicorn.Config(
                _metrics_endpoint(app),
                host=metrics_host,
                port=metrics_port,
                log_config=None,
                access_log=False,
                lifespan="off",
            )
            metrics_server = _QuietServer(config)
        serving = asyncio.create_task(metrics_server.serve()) if metrics_server else None
        try:
            await app.store()
            settle_heap()
            worker = Worker(app, queues=queues, concurrency=concurrency, schedules=schedules, listening_turn=turn)
            if control is not None:
                from conveyor.engine.processes import follow_supervisor  # noqa: PLC0415 - forked workers only

                follow_supervisor(control, worker)
            await worker.run(handle_signals=True)
        finally:
            if metrics_server is not None and serving is not None:
                metrics_server.should_exit = True
                await serving
            await app.close()

    run_async(run())
    if stuck := threads_still_running():
        # Their jobs were handed back already; the threads are daemons and end with the process.
        structlog.get_logger("conveyor.worker").warning("worker.threads_abandoned", threads=stuck)


def _metrics_endpoint(app: Conveyor) -> Callable[..., Coroutine[Any, Any, None]]:
    """A one-route ASGI app: GET /metrics, with queue depth refreshed at most every few seconds."""

    async def endpoint(scope: dict[str, Any], _receive: Any, send: Callable[..., Coroutine[Any, Any, None]]) -> None:
        if scope["path"] != "/metrics":
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b"not found; metrics are at /metrics"})
            return
        await app.metrics.refresh_queues(await app.store(), app.clock())
        body = app.metrics.render()
        headers = [(b"content-type", CONTENT_TYPE.encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return endpoint


class _QuietServer(uvicorn.Server):
    """uvicorn for the metrics port: the worker owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None]:
        yield


@cli.command()
@_with_app
@click.argument("task")
@click.option("--args", "args_json", metavar="JSON", help="Positional arguments as a JSON array.")
@click.option("--kwargs", "kwargs_json", metavar="JSON", help="Keyword arguments as a JSON object.")
@click.option("--queue", help="Queue (default: the task's).")
@click.option("--priority", type=int, help="Higher runs first (default: the task's).")
@click.option("--delay", type=click.FloatRange(min=0), metavar="SECONDS", help="Run no sooner than this.")
@click.option("--max-attempts", type=click.IntRange(min=1), help="Attempts before the job is dead.")
@click.option("--idempotency-key", help="Enqueue once per key: a repeat returns the first job.")
@click.option("--wait", is_flag=True, help="Wait for the job to finish; exit 1 if it fails.")
@click.option("--timeout", type=click.FloatRange(min=0), metavar="SECONDS", help="With --wait: give up after this.")
@JSON_OPTION
def enqueue(
    app: Conveyor,
    task: str,
    args_json: str | None,
    kwargs_json: str | None,
    queue: str | None,
    priority: int | None,
    delay: float | None,
    max_attempts: int | None,
    idempotency_key: str | None,
    wait: bool,
    timeout: float | None,
    as_json: bool,
) -> None:
    """Enqueue a job for TASK."""
    args = _parse_json(args_json, list, "--args")
    kwargs = _parse_json(kwargs_json, dict, "--kwargs")

    async def submit() -> Job:
        try:
            return await app.enqueue(
                task,
                args,
                kwargs,
                queue=queue,
                priority=priority,
                delay=delay,
                max_attempts=max_attempts,
                idempotency_key=idempotency_key,
            )
        finally:
            await app.close()

    job = run_async(submit())
    if not wait:
        if as_json:
            _emit_json(job.to_json())
        else:
            console.print(f"enqueued [bold]{job.id}[/] ({escape(job.task)} on {escape(job.queue)}, {job.state})")
        return
    _finish_with(_wait_for(app, job.id, timeout, as_json), as_json)


@cli.group()
def jobs() -> None:
    """Look at jobs."""


@jobs.command("show")
@_with_app
@click.argument("job_id")
@click.option("--wait", is_flag=True, help="Wait for the job to finish; exit 1 if it fails.")
@click.option("--timeout", type=click.FloatRange(min=0), metavar="SECONDS", help="With --wait: give up after this.")
@JSON_OPTION
def jobs_show(app: Conveyor, job_id: str, wait: bool, timeout: float | None, as_json: bool) -> None:
    """Show one job and its attempts."""
    if wait:
        _finish_with(_wait_for(app, job_id, timeout, as_json), as_json)
        return

    async def get() -> Job:
        try:
            return await app.get_job(job_id)
        finally:
            await app.close()

    job = run_async(get())
    if as_json:
        _emit_json(job.to_json())
    else:
        _show_job(job)


@jobs.command("cancel")
@_with_app
@click.argument("job_ids", nargs=-1, required=True)
@JSON_OPTION
def jobs_cancel(app: Conveyor, job_ids: tuple[str, ...], as_json: bool) -> None:
    """Cancel jobs: at once if not started yet; a running job is asked to stop and ends cancelled."""

    async def cancel() -> tuple[list[Job], list[str]]:
        cancelled: list[Job] = []
        problems: list[str] = []
        try:
            for job_id in job_ids:
                try:
                    cancelled.append(await app.cancel_job(job_id))
                except (JobNotFoundError, JobStateError) as exc:
                    problems.append(str(exc))
        finally:
            await app.close()
        return cancelled, problems

    cancelled, problems = run_async(cancel())
    if as_json:
        stopping = [job.id for job in cancelled if job.state is JobState.RUNNING]
        done = [job.id for job in cancelled if job.state is not JobState.RUNNING]
        _emit_json({"cancelled": done, "stopping": stopping, "errors": problems})
    else:
        stopping_count = sum(job.state is JobState.RUNNING for job in cancelled)
        console.print(f"cancelled {len(cancelled) - stopping_count} job(s)")
        if stopping_count:
            console.print(f"asked {stopping_count} running job(s) to stop; they end cancelled shortly")
        for problem in problems:
            errors.print(f"[red]error:[/] {escape(problem)}", highlight=False)
    if problems:
        sys.exit(EXIT_CONFLICT)


def _list_command(group: click.Group, name: str, fixed_state: JobState | None, help_text: str) -> None:
    @group.command(name, help=help_text)
    @_with_app
    @click.option(
        "--state",
        "states",
        multiple=True,
        type=click.Choice([state.value for state in JobState]),
        hidden=fixed_state is not None,
        help="Only jobs in this state (repeatable).",
    )
    @click.option("--queue", help="Only jobs on this queue.")
    @click.option("--task", help="Only jobs of this task.")
    @click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
    @click.option("--cursor", help="Continue after this job id (from a previous page).")
    @JSON_OPTION
    def list_jobs(
        app: Conveyor,
        states: tuple[str, ...],
        queue: str | None,
        task: str | None,
        limit: int,
        cursor: str | None,
        as_json: bool,
    ) -> None:
        chosen = (fixed_state.value,) if fixed_state else states

        async def fetch() -> Any:
            try:
                return await app.list_jobs(states=chosen, queue=queue, task=task, limit=limit, cursor=cursor)
            finally:
                await app.close()

        page = run_async(fetch())
        if as_json:
            _emit_json({"jobs": [job.to_json() for job in page.jobs], "next_cursor": page.next_cursor})
            return
        console.print(_jobs_table(page.jobs, f"{len(page.jobs)} jobs"))
        if page.next_cursor:
            console.print(f"more: --cursor {page.next_cursor}")


_list_command(jobs, "list", None, "List jobs, newest first.")


@cli.group()
def workflows() -> None:
    """Look at workflows (chain, group, chord)."""


@workflows.command("show")
@_with_app
@click.argument("workflow_id")
@click.option("--wait", is_flag=True, help="Wait for every step to finish; exit 1 unless it succeeded.")
@click.option("--timeout", type=click.FloatRange(min=0), metavar="SECONDS", help="With --wait: give up after this.")
@JSON_OPTION
def workflows_show(app: Conveyor, workflow_id: str, wait: bool, timeout: float | None, as_json: bool) -> None:
    """Show a workflow: its state, its result, and every step's job."""

    async def get() -> Workflow:
        try:
            if wait:
                return await app.wait_for_workflow(workflow_id, timeout=timeout)
            return await app.get_workflow(workflow_id)
        finally:
            await app.close()

    workflow = run_async(get())
    if as_json:
        _emit_json(workflow.to_json())
    else:
        title = f"workflow {workflow.id}" + (f" ({escape(workflow.name)})" if workflow.name else "")
        console.print(f"[bold]{title}[/]: {workflow.state.value}")
        if workflow.state is WorkflowState.SUCCEEDED:
            console.print(f"result: {escape(orjson.dumps(workflow.result).decode())}")
        console.print(_jobs_table(list(workflow.jobs), "steps"))
    if wait and workflow.state is not WorkflowState.SUCCEEDED:
        sys.exit(EXIT_JOB_FAILED)


@cli.group()
def dlq() -> None:
    """The dead-letter queue: jobs that ran out of attempts or failed permanently."""


_list_command(dlq, "list", JobState.DEAD, "List dead jobs, newest first.")


@dlq.command("replay")
@_with_app
@click.argument("job_ids", nargs=-1)
@click.option("--all", "replay_all", is_flag=True, help="Replay every dead job.")
@click.option("--queue", help="With --all: only dead jobs of this queue.")
@click.option("--task", help="With --all: only dead jobs of this task.")
@JSON_OPTION
def dlq_replay(
    app: Conveyor, job_ids: tuple[str, ...], replay_all: bool, queue: str | None, task: str | None, as_json: bool
) -> None:
    """Queue dead jobs again, each with its full number of attempts."""
    if bool(job_ids) == replay_all:
        raise click.UsageError("give job ids or --all, not both and not neither")

    async def replay() -> tuple[list[Job], list[str]]:
        replayed: list[Job] = []
        problems: list[str] = []
        try:
            ids = list(job_ids)
            if replay_all:
                cursor = None
                while True:
                    page = await app.list_jobs(states=[JobState.DEAD], queue=queue, task=task, cursor=cursor, limit=500)
                    ids.extend(job.id for job in page.jobs)
                    if page.next_cursor is None:
                        break
                    cursor = page.next_cursor
            with Progress(console=errors, disable=as_json or not errors.is_terminal) as progress:
                bar = progress.add_task("replaying", total=len(ids))
                for job_id in ids:
                    try:
                        replayed.append(await app.retry_job(job_id))
                    except (JobNotFoundError, JobStateError) as exc:
                        problems.append(str(exc))
                    progress.advance(bar)
        finally:
            await app.close()
        return replayed, problems

    replayed, problems = run_async(replay())
    if as_json:
        _emit_json({"replayed": [job.id for job in replayed], "errors": problems})
    else:
        console.print(f"replayed {len(replayed)} job(s)")
        for problem in problems:
            errors.print(f"[red]error:[/] {escape(problem)}", highlight=False)
    if problems:
        sys.exit(EXIT_CONFLICT)


@cli.group()
def schedules() -> None:
    """Periodic tasks: what runs when."""


@schedules.command("list")
@_with_app
@JSON_OPTION
def schedules_list(app: Conveyor, as_json: bool) -> None:
    """List the app's schedules: cron, time zone, next run, and the job of the latest tick."""

    async def fetch() -> list[ScheduleStatus]:
        try:
            return await app.list_schedules()
        finally:
            await app.close()

    found = run_async(fetch())
    if as_json:
        _emit_json({"schedules": [status.to_json() for status in found]})
        return
    table = Table(title=f"{len(found)} schedules", title_justify="left")
    for column in ("name", "task", "cron", "timezone", "queue", "missed"):
        table.add_column(column, overflow="fold")
    # Times and ids stay whole on one line, to be read at a glance and copied.
    for column in ("next run", "last tick", "last job"):
        table.add_column(column, no_wrap=True)
    for status in found:
        schedule = status.schedule
        table.add_row(
            escape(schedule.name),
            escape(schedule.task),
            escape(schedule.cron.expression),
            escape(schedule.cron.timezone),
            escape(schedule.queue),
            schedule.missed,
            _when(status.next_run_at),
            _when(status.last_tick_at),
            status.last_job_id or "-",
        )
    console.print(table)


@cli.group()
def db() -> None:
    """The database schema and its housekeeping."""


def _settings_only() -> Conveyor:
    try:
        return Conveyor(auto_migrate=False)
    except ConfigError as exc:
        _fail(str(exc), EXIT_BAD_INPUT)


def _migrate_to(revision: str, migration: Callable[[], Coroutine[Any, Any, T]]) -> T:
    from alembic.util import CommandError  # noqa: PLC0415

    try:
        return run_async(migration())
    except CommandError as exc:  # no such revision, or not a target from the current one: bad input
        _fail(f"cannot migrate to {revision!r}: {exc}", EXIT_BAD_INPUT)


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
def db_upgrade(revision: str) -> None:
    """Migrate the schema up (creating it if needed)."""
    from conveyor.storage import dialects, migrate  # noqa: PLC0415 - keeps other commands' start-up light

    app = _settings_only()

    async def upgrade() -> migrate.SchemaStatus:
        engine = dialects.create_engine(app.settings)
        try:
            return await migrate.upgrade(engine, revision)
        finally:
            await engine.dispose()

    status = _migrate_to(revision, upgrade)
    console.print(f"schema at revision {status.current} (head {status.head})")


@db.command("downgrade")
@click.argument("revision")
def db_downgrade(revision: str) -> None:
    """Migrate the schema down to REVISION (``base`` drops Conveyor's tables)."""
    from conveyor.storage import dialects, migrate  # noqa: PLC0415

    app = _settings_only()

    async def downgrade() -> migrate.SchemaStatus:
        engine = dialects.create_engine(app.settings)
        try:
            return await migrate.downgrade(engine, revision)
        finally:
            await engine.dispose()

    status = _migrate_to(revision, downgrade)
    console.print(f"schema at revision {status.current or 'base'} (head {status.head})")


@db.command("current")
@JSON_OPTION
def db_current(as_json: bool) -> None:
    """Show the schema revision; exit 4 if it is not the one this Conveyor needs."""
    from conveyor.storage import dialects, migrate  # noqa: PLC0415

    app = _settings_only()

    async def current() -> migrate.SchemaStatus:
        engine = dialects.create_engine(app.settings)
        try:
            return await migrate.status(engine)
        finally:
            await engine.dispose()

    status = run_async(current())
    if as_json:
        _emit_json({"current": status.current, "head": status.head, "up_to_date": status.up_to_date})
    else:
        console.print(f"current: {status.current or 'none (empty database)'}\nhead:    {status.head}")
    if not status.up_to_date:
        sys.exit(EXIT_STORAGE)


@db.command("prune")
@click.option(
    "--older-than", type=click.FloatRange(min=0), required=True, metavar="SECONDS", help="Finished more than this ago."
)
@JSON_OPTION
def db_prune(older_than: float, as_json: bool) -> None:
    """Delete finished jobs (succeeded, dead, cancelled) older than --older-than seconds."""
    app = load_app(None)

    async def prune() -> int:
        try:
            return await app.prune(older_than)
        finally:
            await app.close()

    deleted = run_async(prune())
    if as_json:
        _emit_json({"deleted": deleted})
    else:
        console.print(f"deleted {deleted} finished job(s)")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@cli.command()
@_with_app
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, MAX_PORT))
@click.option("--no-worker", is_flag=True, help="Serve the API only; run workers elsewhere.")
@click.option("--concurrency", "-c", type=click.IntRange(1, 10_000), help="Embedded worker's jobs at once.")
@click.option("--insecure", is_flag=True, help="Allow serving without API tokens on a non-loopback address.")
@click.option("--access-log/--no-access-log", default=True, show_default=True, help="Log every request.")
def serve(
    app: Conveyor, host: str, port: int, no_worker: bool, concurrency: int | None, insecure: bool, access_log: bool
) -> None:
    """Run the HTTP API (and, unless --no-worker, a worker in the same process)."""
    from conveyor.api import create_app  # noqa: PLC0415

    configure_logging(app.settings)
    log = structlog.get_logger("conveyor.api")

    async def run() -> None:
        store = await app.store()
        if await store.count_tokens() == 0:
            if not _is_loopback(host) and not insecure:
                await app.close()
                raise ConfigError(
                    f"refusing to serve on {host} without API tokens",
                    [
                        "create one with `conveyor tokens create --name NAME --scope admin`",
                        "or listen on a loopback address (--host 127.0.0.1)",
                        "or pass --insecure to serve an open API anyway",
                    ],
                )
            log.warning("api.open", host=host, reason="no API tokens exist: every request is allowed")
        config = uvicorn.Config(
            create_app(app, run_worker=not no_worker, concurrency=concurrency),
            host=host,
            port=port,
            log_config=None,
            access_log=access_log,
            lifespan="on",
            timeout_graceful_shutdown=int(app.settings.shutdown_grace_seconds) + 5,
        )
        log.info("api.starting", host=host, port=port, worker=not no_worker)
        settle_heap()
        await _Server(config).serve()

    run_async(run())


class _Server(uvicorn.Server):
    """uvicorn, but a graceful stop on SIGTERM/SIGINT exits 0 instead of re-raising the signal."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None]:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self.handle_exit, signum, None)
        try:
            yield
        finally:
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # uvicorn waits for open requests before the lifespan ends: answer held long-polls now,
        # or each would hold the stop for the whole graceful timeout and then get a bare 500.
        from conveyor.api.watch import JobWatcher  # noqa: PLC0415 - loaded by serve already

        watcher = getattr(getattr(self.config.app, "state", None), "watcher", None)
        if isinstance(watcher, JobWatcher):
            watcher.release_all()
        await super().shutdown(sockets)


@cli.group()
def tokens() -> None:
    """API tokens for the HTTP API."""


@tokens.command("create")
@click.option("--name", required=True, help="Who or what the token is for.")
@click.option(
    "--scope",
    "scopes",
    multiple=True,
    required=True,
    type=click.Choice([scope.value for scope in Scope]),
    help="jobs:read, jobs:write or admin (repeatable).",
)
@JSON_OPTION
def tokens_create(name: str, scopes: tuple[str, ...], as_json: bool) -> None:
    """Create a token. It is shown once and stored only as a hash."""
    app = load_app(None)

    async def create() -> NewToken:
        try:
            new = create_token(name, scopes, now=app.clock())
            await (await app.store()).insert_token(new.record)
            return new
        finally:
            await app.close()

    new = run_async(create())
    if as_json:
        _emit_json({"id": new.record.id, "name": name, "scopes": list(new.record.scopes), "token": new.plaintext})
        return
    errors.print(f"token {new.record.id} ({escape(name)}; {', '.join(new.record.scopes)}). Shown once, keep it safe:")
    click.echo(new.plaintext)


@tokens.command("list")
@JSON_OPTION
def tokens_list(as_json: bool) -> None:
    """List tokens (never their secrets)."""
    app = load_app(None)

    async def fetch() -> list[TokenRecord]:
        try:
            return await (await app.store()).list_tokens()
        finally:
            await app.close()

    found = run_async(fetch())
    if as_json:
        _emit_json(
            [
                {
                    "id": token.id,
                    "name": token.name,
                    "scopes": list(token.scopes),
                    "created_at": token.created_at.isoformat(),
                    "revoked_at": token.revoked_at.isoformat() if token.revoked_at else None,
                }
                for token in found
            ]
        )
        return
    table = Table(title=f"{len(found)} tokens", title_justify="left")
    for column in ("id", "name", "scopes", "created", "revoked"):
        table.add_column(column)
    for token in found:
        table.add_row(
            token.id, escape(token.name), ", ".join(token.scopes), _when(token.created_at), _when(token.revoked_at)
        )
    console.print(table)


@tokens.command("revoke")
@click.argument("token_id")
def tokens_revoke(token_id: str) -> None:
    """Revoke a token at once: requests carrying it get 401."""
    app = load_app(None)

    async def revoke() -> bool:
        try:
            return await (await app.store()).revoke_token(token_id, now=app.clock())
        finally:
            await app.close()

    if not run_async(revoke()):
        _fail(f"no active token with id {token_id!r}", EXIT_CONFLICT)
    console.print(f"revoked {token_id}")


def main() -> None:
    cli(prog_name="conveyor")
