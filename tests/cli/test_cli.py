"""The ``conveyor`` command, run in this process with Click's CliRunner: every command's input
checks, output and exit codes (0 done, 1 job failed, 2 bad input, 3 no such job / wrong state,
4 database or schema), each test on its own SQLite file.

How the CLI finds its database here. A CLI process sets ``CONVEYOR_DATABASE_URL`` (from the
environment or ``--database-url``) and only then imports the ``--app`` module, whose
``Conveyor()`` reads the URL at import time. In one pytest process a module is imported once, so
``--app tests.support.tasks:app`` (or ``conveyor.examples:app``) would stay bound to the first
test's database, and "nothing was stored" would be checked against the wrong file. So the
``tasks_app`` fixture takes ``tests.support.tasks`` out of ``sys.modules`` and imports it afresh
with this test's URL, exactly as a new CLI process would, and puts the original back afterwards.
Commands without ``--app`` build their ``Conveyor()`` per call and need no such care. Flows
that need a real worker process or a real ``python -m conveyor`` are in test_cli_process.py, and so
is every ``worker`` run: in this process, a check that wrongly let it through would run a worker
here until the test timed out.

Rich wraps output at the terminal width (80 columns off a terminal, which folds a 36-character
job id inside a table), so every run sets COLUMNS=200 and messages are compared with their
whitespace collapsed.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib
import importlib.metadata
import json
import sqlite3
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import tests.support
from click.testing import CliRunner, Result

from conveyor import Conveyor, Job, Step, Workflow, chain
from conveyor.cli import GC_YOUNG_THRESHOLD, cli, settle_heap
from conveyor.engine.scheduler import Scheduler
from conveyor.storage.migrate import VERSION_TABLE, head_revision
from conveyor.testing import drain

TASKS_MODULE = "tests.support.tasks"
APP = f"{TASKS_MODULE}:app"


def flat(text: str) -> str:
    """Text with every run of whitespace (including Rich's line wrapping) made one space."""
    return " ".join(text.split())


@dataclass(frozen=True)
class Cli:
    """``conveyor ...`` in this process, on this test's database."""

    database_url: str

    def __call__(self, *args: str, env: dict[str, str] | None = None) -> Result:
        # CONVEYOR_DATABASE_URL is always passed so that CliRunner restores it afterwards:
        # `--database-url` writes it into os.environ, which would otherwise leak into later tests.
        environment = {"CONVEYOR_DATABASE_URL": self.database_url, "COLUMNS": "200", **(env or {})}
        return CliRunner(catch_exceptions=False).invoke(cli, list(args), env=environment, prog_name="conveyor")

    def json(self, *args: str) -> Any:
        result = self(*args, "--json")
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    def jobs(self, *args: str) -> list[dict[str, Any]]:
        """Every stored job (newest first), through `jobs list --json`."""
        return self.json("jobs", "list", "--limit", "10000", *args)["jobs"]

    def enqueue(self, task: str, *args: str) -> str:
        """Enqueue through the CLI; return the new job's id."""
        return self.json("enqueue", "--app", APP, task, *args)["id"]

    def show(self, job_id: str) -> dict[str, Any]:
        return self.json("jobs", "show", job_id)


@pytest.fixture(autouse=True)
def _keep_sys_path(_clean_environment: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--app` puts the working directory (this test's tmp_path) on sys.path; take it off afterwards."""
    monkeypatch.syspath_prepend(str(Path.cwd()))


@pytest.fixture
def run(database_url: str) -> Cli:
    return Cli(database_url)


@pytest.fixture
def fresh_tasks_module() -> Iterator[None]:
    """The next ``import tests.support.tasks`` runs the module again; the original is put back after."""
    saved_module = sys.modules.pop(TASKS_MODULE, None)
    saved_attribute = tests.support.__dict__.get("tasks")
    try:
        yield
    finally:
        sys.modules.pop(TASKS_MODULE, None)
        if saved_module is not None:
            sys.modules[TASKS_MODULE] = saved_module
        if saved_attribute is not None:
            tests.support.__dict__["tasks"] = saved_attribute
        else:
            tests.support.__dict__.pop("tasks", None)


@pytest.fixture
def tasks_app(fresh_tasks_module: None, database_url: str, monkeypatch: pytest.MonkeyPatch) -> Conveyor:
    """``tests.support.tasks:app`` imported for this test's database, as a CLI process would import it."""
    monkeypatch.setenv("CONVEYOR_DATABASE_URL", database_url)
    app = importlib.import_module(TASKS_MODULE).app
    assert isinstance(app, Conveyor)
    assert app.settings.database_url.endswith(database_url.removeprefix("sqlite:"))
    return app


def run_due_jobs(app: Conveyor) -> None:
    """Run jobs until none is due, with a worker in this process (`conveyor.testing.drain`)."""

    async def run() -> None:
        try:
            await drain(app)
        finally:
            await app.close()

    asyncio.run(run())


def database_path(database_url: str) -> Path:
    return Path(database_url.removeprefix("sqlite:///"))


def tables(database_url: str) -> set[str]:
    with contextlib.closing(sqlite3.connect(database_path(database_url))) as connection:
        return {name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


# -- the command itself ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--help"], ["worker", "enqueue", "jobs", "dlq", "db"]),
        (["-h"], ["worker", "enqueue", "jobs", "dlq", "db"]),
        (["jobs", "--help"], ["show", "list"]),
        (["dlq", "--help"], ["list", "replay"]),
        (["db", "--help"], ["upgrade", "downgrade", "current", "prune"]),
        (["schedules", "--help"], ["list"]),
    ],
)
def test_help_lists_the_subcommands(run: Cli, args: list[str], expected: list[str]) -> None:
    result = run(*args)

    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("Usage: conveyor")
    for command in expected:
        assert f"  {command} " in result.stdout


def test_version_prints_the_installed_version(run: Cli) -> None:
    result = run("--version")

    assert result.exit_code == 0
    assert result.stdout == f"conveyor, version {importlib.metadata.version('conveyor')}\n"


def test_unknown_subcommand_is_a_usage_error(run: Cli) -> None:
    result = run("frobnicate")

    assert result.exit_code == 2
    assert "No such command 'frobnicate'" in result.stderr


# -- enqueue ---------------------------------------------------------------------------------


def test_enqueue_stores_the_job_with_every_option_given(run: Cli, tasks_app: Conveyor) -> None:
    enqueued = run.json(
        "enqueue", "--app", APP, "noop", "--args", "[7]", "--queue", "reports", "--priority", "5", "--max-attempts", "2"
    )

    stored = run.show(enqueued["id"])
    assert stored == enqueued
    assert stored["task"] == "noop"
    assert stored["args"] == [7]
    assert stored["kwargs"] == {}
    assert stored["queue"] == "reports"
    assert stored["priority"] == 5
    assert stored["max_attempts"] == 2
    assert stored["state"] == "queued"
    assert stored["attempt"] == 0
    assert [job["id"] for job in run.jobs()] == [enqueued["id"]]


def test_enqueue_defaults_come_from_the_task(run: Cli, tasks_app: Conveyor) -> None:
    job = run.show(run.enqueue("always_fails", "--args", '["boom"]'))

    assert job["queue"] == "default"
    assert job["priority"] == 0
    assert job["max_attempts"] == 3, "always_fails is registered with max_attempts=3"


def test_enqueue_passes_kwargs_to_the_task(run: Cli, tasks_app: Conveyor) -> None:
    job_id = run.enqueue("noop", "--kwargs", '{"n": 41}')

    run_due_jobs(tasks_app)

    job = run.show(job_id)
    assert job["state"] == "succeeded"
    assert job["result"] == 41


def test_enqueue_prints_the_new_job_for_people(run: Cli, tasks_app: Conveyor) -> None:
    result = run("enqueue", "--app", APP, "noop", "--args", "[1]", "--queue", "mail")

    assert result.exit_code == 0, result.output
    (job,) = run.jobs()
    assert result.stdout == f"enqueued {job['id']} (noop on mail, queued)\n"


def test_enqueue_takes_the_app_from_conveyor_app(run: Cli, tasks_app: Conveyor) -> None:
    result = run("enqueue", "noop", "--args", "[1]", "--json", env={"CONVEYOR_APP": APP})

    assert result.exit_code == 0, result.output
    assert [job["id"] for job in run.jobs()] == [json.loads(result.stdout)["id"]]


def test_enqueue_with_delay_is_scheduled_for_later(run: Cli, tasks_app: Conveyor) -> None:
    job = run.show(run.enqueue("noop", "--args", "[1]", "--delay", "3600"))

    assert job["state"] == "scheduled"
    delay = datetime.fromisoformat(job["run_at"]) - datetime.fromisoformat(job["created_at"])
    assert timedelta(seconds=3599) < delay <= timedelta(seconds=3601)

    run_due_jobs(tasks_app)
    assert run.show(job["id"])["state"] == "scheduled", "a worker leaves it until it is due"


def test_enqueue_with_the_same_idempotency_key_returns_the_first_job(run: Cli, tasks_app: Conveyor) -> None:
    first = run.enqueue("noop", "--args", "[1]", "--idempotency-key", "order-42")
    second = run.enqueue("noop", "--args", "[2]", "--idempotency-key", "order-42")
    other = run.enqueue("noop", "--args", "[3]", "--idempotency-key", "order-43")

    assert second == first
    assert other != first
    assert {job["id"] for job in run.jobs()} == {first, other}
    assert run.show(first)["args"] == [1], "the repeat did not overwrite the first job"


def test_enqueue_wait_without_a_worker_gives_up_at_the_timeout_with_exit_1(run: Cli, tasks_app: Conveyor) -> None:
    result = run("enqueue", "--app", APP, "noop", "--args", "[1]", "--wait", "--timeout", "0.5", "--json")

    assert result.exit_code == 1, result.output
    job = json.loads(result.stdout)
    assert job["state"] == "queued"
    assert run.show(job["id"])["state"] == "queued", "the job stays queued for a worker"


# -- enqueue: bad input stores nothing ---------------------------------------------------------


def test_enqueue_unknown_task_exits_2_and_lists_the_registered_tasks(run: Cli, tasks_app: Conveyor) -> None:
    result = run("enqueue", "--app", APP, "no_such_task", "--args", "[1]")

    assert result.exit_code == 2
    message = flat(result.stderr)
    assert "unknown task 'no_such_task'" in message
    registered = message.partition("registered: ")[2]
    for name in ("noop", "always_fails", "permanent_failure", "fails_without_marker"):
        assert name in registered
    assert run.jobs() == []


def test_enqueue_without_an_app_says_no_tasks_are_registered(run: Cli) -> None:
    result = run("enqueue", "noop", "--args", "[1]")

    assert result.exit_code == 2
    assert "unknown task 'noop' (no tasks are registered)" in flat(result.stderr)
    assert run.jobs() == []


def test_enqueue_with_wrong_arguments_exits_2_and_lists_every_problem(run: Cli, tasks_app: Conveyor) -> None:
    result = run("enqueue", "--app", APP, "noop", "--args", '["seven"]', "--queue", "", "--idempotency-key", "")

    assert result.exit_code == 2
    lines = [line.strip() for line in result.stderr.splitlines()]
    assert lines[0] == "error: cannot enqueue task 'noop'"
    problems = lines[1:]
    assert len(problems) == 3, result.stderr
    assert problems[0].startswith("- n: Input should be a valid integer")
    assert "- queue must be 1 to 255 characters" in problems
    assert "- idempotency_key must be 1 to 255 characters" in problems
    assert run.jobs() == []


@pytest.mark.parametrize(
    ("args", "problems"),
    [
        (["--args", "[1, 2]"], ["takes 1 positional argument(s) but 2 were given"]),
        (["--args", "[]"], ["missing required argument 'n'"]),
        (
            ["--args", "[1, 2]", "--kwargs", '{"n": 3, "m": 4}'],
            [
                "takes 1 positional argument(s) but 2 were given",
                "unexpected keyword argument 'm'",
                "'n' is given both by position and by keyword",
            ],
        ),
    ],
)
def test_enqueue_arguments_that_do_not_fit_the_signature_exit_2_listing_each_problem(
    run: Cli, tasks_app: Conveyor, args: list[str], problems: list[str]
) -> None:
    result = run("enqueue", "--app", APP, "noop", *args)

    assert result.exit_code == 2
    lines = [line.strip() for line in result.stderr.splitlines()]
    assert lines[0] == "error: cannot enqueue task 'noop'"
    assert sorted(lines[1:]) == sorted(f"- {problem}" for problem in problems)
    assert run.jobs() == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--args", "[1,"], "Invalid value for --args: not valid JSON"),
        (["--args", "n=1"], "Invalid value for --args: not valid JSON"),
        (["--kwargs", "{n: 1}"], "Invalid value for --kwargs: not valid JSON"),
        (["--args", '{"n": 1}'], "Invalid value for --args: must be an array, e.g. [1, 2]"),
        (["--args", "1"], "Invalid value for --args: must be an array, e.g. [1, 2]"),
        (["--kwargs", "[1]"], 'Invalid value for --kwargs: must be an object, e.g. {"a": 1}'),
    ],
)
def test_enqueue_arguments_that_are_not_the_right_json_are_a_usage_error(
    run: Cli, tasks_app: Conveyor, args: list[str], message: str
) -> None:
    result = run("enqueue", "--app", APP, "noop", *args)

    assert result.exit_code == 2
    assert result.stderr.startswith("Usage: conveyor enqueue")
    assert message in flat(result.stderr)
    assert run.jobs() == []


@pytest.mark.parametrize(
    "option",
    [["--priority", "high"], ["--delay", "-1"], ["--max-attempts", "0"], ["--timeout", "-1"]],
)
def test_enqueue_option_values_out_of_range_are_a_usage_error(run: Cli, tasks_app: Conveyor, option: list[str]) -> None:
    result = run("enqueue", "--app", APP, "noop", "--args", "[1]", *option)

    assert result.exit_code == 2
    assert f"Invalid value for '{option[0]}'" in result.stderr
    assert run.jobs() == []


@pytest.mark.parametrize(
    "command",
    [
        ["jobs", "list"],
        ["jobs", "show", "some-id"],
        ["dlq", "replay", "--all"],
        ["db", "upgrade"],
        ["db", "current"],
        ["db", "prune", "--older-than", "0"],
        ["enqueue", "--app", APP, "noop", "--args", "[1]"],
    ],
)
def test_unsupported_database_url_exits_2_with_a_clear_message(
    run: Cli, fresh_tasks_module: None, command: list[str]
) -> None:
    # fresh_tasks_module: the --app module is imported during the command, after --database-url
    # is set, so its Conveyor() meets the bad URL as it would in a CLI process.
    result = run("--database-url", "mysql://x", *command)

    assert result.exit_code == 2, result.output
    message = flat(result.stderr)
    assert message.startswith("error: invalid Conveyor settings")
    assert "database_url (CONVEYOR_DATABASE_URL): unsupported database scheme 'mysql'" in message
    assert "sqlite:///path.db or postgresql://user@host/db" in message
    assert run.jobs() == [], "nothing went to the database the environment names either"


def test_database_url_option_overrides_the_environment(run: Cli, tmp_path: Path) -> None:
    other = Cli(f"sqlite:///{tmp_path / 'other.db'}")

    result = run("--database-url", other.database_url, "db", "upgrade")

    assert result.exit_code == 0, result.output
    assert "conveyor_jobs" in tables(other.database_url)
    assert not database_path(run.database_url).exists()


@pytest.mark.parametrize(
    ("reference", "message"),
    [
        ("no_such_module_anywhere:app", "cannot import 'no_such_module_anywhere' (from --app"),
        (f"{TASKS_MODULE}:no_such_attribute", f"'{TASKS_MODULE}' has no attribute 'no_such_attribute'"),
        (f"{TASKS_MODULE}:app.no_such_attribute", f"'{TASKS_MODULE}' has no attribute 'no_such_attribute'"),
        (f"{TASKS_MODULE}:noop", f"--app '{TASKS_MODULE}:noop' is a Task, not a Conveyor app"),
        (f"{TASKS_MODULE}:record", f"--app '{TASKS_MODULE}:record' is a function, not a Conveyor app"),
        (TASKS_MODULE + ":app.settings", f"--app '{TASKS_MODULE}:app.settings' is a Settings, not a Conveyor app"),
    ],
)
def test_app_that_cannot_be_loaded_exits_2(run: Cli, tasks_app: Conveyor, reference: str, message: str) -> None:
    result = run("enqueue", "--app", reference, "noop", "--args", "[1]")

    assert result.exit_code == 2, result.output
    assert message in flat(result.stderr)
    assert run.jobs() == []


def test_app_module_that_fails_on_import_exits_2_and_shows_why(run: Cli, tmp_path: Path) -> None:
    (tmp_path / "broken_app.py").write_text('raise RuntimeError("the app module failed at import")\n')

    result = run("enqueue", "--app", "broken_app:app", "noop", "--args", "[1]")

    assert result.exit_code == 2, result.output
    message = flat(result.stderr)
    assert "cannot import 'broken_app' (from --app 'broken_app:app')" in message
    assert "RuntimeError: the app module failed at import" in message
    assert 'broken_app.py", line 1' in message, "the traceback points at the app's own code"
    assert "broken_app" not in sys.modules
    assert run.jobs() == []


def test_app_module_in_the_working_directory_is_found(run: Cli, tmp_path: Path) -> None:
    (tmp_path / "cwd_app.py").write_text(
        "from conveyor import Conveyor\n\napp = Conveyor()\n\n\n@app.task\nasync def hello() -> str:\n    return 'hi'\n"
    )
    try:
        job = run.json("enqueue", "--app", "cwd_app", "hello")
    finally:
        sys.modules.pop("cwd_app", None)

    assert job["task"] == "hello"
    assert [stored["id"] for stored in run.jobs()] == [job["id"]]


# -- jobs show / list ----------------------------------------------------------------------


def test_jobs_show_unknown_id_exits_3(run: Cli) -> None:
    result = run("jobs", "show", "no-such-job")

    assert result.exit_code == 3
    assert flat(result.stderr) == "error: no job with id 'no-such-job'"


def test_jobs_show_wait_on_an_unknown_id_exits_3(run: Cli) -> None:
    result = run("jobs", "show", "no-such-job", "--wait", "--timeout", "5")

    assert result.exit_code == 3
    assert "no job with id 'no-such-job'" in result.stderr


def test_jobs_show_wait_exits_0_for_a_succeeded_job_and_1_for_a_dead_one(run: Cli, tasks_app: Conveyor) -> None:
    succeeded = run.enqueue("noop", "--args", "[5]")
    dead = run.enqueue("permanent_failure")
    queued_later = run.enqueue("noop", "--args", "[6]", "--delay", "3600")
    run_due_jobs(tasks_app)

    ok = run("jobs", "show", succeeded, "--wait", "--json")
    failed = run("jobs", "show", dead, "--wait", "--json")
    unfinished = run("jobs", "show", queued_later, "--wait", "--timeout", "0.2", "--json")

    assert (ok.exit_code, json.loads(ok.stdout)["result"]) == (0, 5)
    assert (failed.exit_code, json.loads(failed.stdout)["state"]) == (1, "dead")
    assert (unfinished.exit_code, json.loads(unfinished.stdout)["state"]) == (1, "scheduled")


def test_jobs_show_renders_the_job_and_its_attempts_for_people(run: Cli, tasks_app: Conveyor) -> None:
    job_id = run.enqueue("permanent_failure")
    run_due_jobs(tasks_app)

    result = run("jobs", "show", job_id)

    assert result.exit_code == 0, result.output
    out = result.stdout
    assert f"job {job_id}" in out
    assert "permanent_failure" in out
    assert "dead" in out
    assert "1/1" in out
    assert "PermanentError: this input can never work" in out
    assert "attempts" in out
    assert "failed" in out, "the attempt's outcome is listed"


def test_output_shows_text_with_brackets_as_it_is(run: Cli, tasks_app: Conveyor) -> None:
    # Rich reads "[...]" as markup: user text printed through it must be escaped.
    text = "[/etc] and [bold]not bold"
    job_id = run.enqueue("always_fails", "--args", json.dumps([text]))
    run_due_jobs(tasks_app)  # it fails (retrying or dead by now), and keeps the error

    enqueued = run("enqueue", "--app", APP, "noop", "--args", "[1]", "--queue", "[/q]")
    shown = run("jobs", "show", job_id)
    listed = run("jobs", "list")
    missing = run("jobs", "show", "[/x]")

    assert enqueued.exit_code == 0, enqueued.output
    assert "(noop on [/q], queued)" in enqueued.stdout
    assert shown.exit_code == 0, shown.output
    assert json.dumps([text]) in shown.stdout
    assert f"RuntimeError: {text}" in shown.stdout
    assert listed.exit_code == 0, listed.output
    assert f"RuntimeError: {text}" in listed.stdout
    assert "[/q]" in listed.stdout
    assert missing.exit_code == 3, missing.output
    assert "no job with id '[/x]'" in missing.stderr


def test_jobs_list_filters_by_state_queue_and_task(run: Cli, tasks_app: Conveyor) -> None:
    dead = run.enqueue("permanent_failure")
    run_due_jobs(tasks_app)
    default = run.enqueue("noop", "--args", "[1]")
    mail = run.enqueue("noop", "--args", "[2]", "--queue", "mail")
    mail_failing = run.enqueue("always_fails", "--args", '["x"]', "--queue", "mail")
    later = run.enqueue("noop", "--args", "[3]", "--delay", "3600")

    def ids(*args: str) -> list[str]:
        return [job["id"] for job in run.jobs(*args)]

    assert ids() == [later, mail_failing, mail, default, dead], "newest first"
    assert ids("--state", "dead") == [dead]
    assert ids("--state", "queued") == [mail_failing, mail, default]
    assert ids("--state", "scheduled", "--state", "dead") == [later, dead]
    assert ids("--state", "succeeded") == []
    assert ids("--queue", "mail") == [mail_failing, mail]
    assert ids("--task", "noop") == [later, mail, default]
    assert ids("--task", "noop", "--queue", "mail") == [mail]
    assert ids("--task", "noop", "--queue", "default", "--state", "queued") == [default]
    assert ids("--queue", "nowhere") == []


def test_jobs_list_pages_through_every_job_with_limit_and_cursor(run: Cli, tasks_app: Conveyor) -> None:
    created = [run.enqueue("noop", "--args", f"[{n}]") for n in range(5)]

    seen: list[str] = []
    cursors: list[str | None] = []
    cursor: list[str] = []
    while True:
        page = run.json("jobs", "list", "--limit", "2", *cursor)
        assert len(page["jobs"]) <= 2
        seen.extend(job["id"] for job in page["jobs"])
        cursors.append(page["next_cursor"])
        if page["next_cursor"] is None:
            break
        cursor = ["--cursor", page["next_cursor"]]

    assert seen == created[::-1], "every job once, newest first"
    assert len(cursors) == 3
    assert cursors[:2] == [seen[1], seen[3]], "the cursor is the last id of the page"


def test_jobs_list_for_people_is_a_table_with_the_job_ids_and_a_next_page_hint(run: Cli, tasks_app: Conveyor) -> None:
    older = run.enqueue("noop", "--args", "[1]", "--queue", "mail")
    newer = run.enqueue("noop", "--args", "[2]")

    everything = run("jobs", "list")
    first_page = run("jobs", "list", "--limit", "1")

    assert everything.exit_code == 0, everything.output
    assert everything.stdout.startswith("2 jobs")
    rows = [line for line in everything.stdout.splitlines() if older in line or newer in line]
    assert len(rows) == 2
    assert all(header in everything.stdout for header in ("id", "task", "queue", "state", "attempt", "run at"))
    assert "noop" in rows[1]
    assert "mail" in rows[1]
    assert "queued" in rows[1]
    assert "0/5" in rows[1]
    assert "more:" not in everything.stdout
    assert first_page.exit_code == 0
    assert newer in first_page.stdout
    assert older not in first_page.stdout
    assert first_page.stdout.rstrip().endswith(f"more: --cursor {newer}")


@pytest.mark.parametrize(
    "args",
    [["--state", "sleeping"], ["--limit", "0"], ["--limit", "10001"], ["--limit", "many"]],
)
def test_jobs_list_bad_filter_values_are_a_usage_error(run: Cli, args: list[str]) -> None:
    result = run("jobs", "list", *args)

    assert result.exit_code == 2
    assert f"Invalid value for '{args[0]}'" in result.stderr


# -- the dead-letter queue -----------------------------------------------------------------------


def test_dlq_list_shows_only_dead_jobs(run: Cli, tasks_app: Conveyor) -> None:
    dead = run.enqueue("permanent_failure")
    succeeded = run.enqueue("noop", "--args", "[1]")
    run_due_jobs(tasks_app)
    queued = run.enqueue("noop", "--args", "[2]")
    scheduled = run.enqueue("noop", "--args", "[3]", "--delay", "3600")

    listed = run.json("dlq", "list")["jobs"]
    for_people = run("dlq", "list")

    assert [job["id"] for job in listed] == [dead]
    assert listed[0]["state"] == "dead"
    assert for_people.exit_code == 0
    assert dead in for_people.stdout
    assert "PermanentError: this input can never work" in for_people.stdout
    for other in (succeeded, queued, scheduled):
        assert other not in for_people.stdout
    assert run.json("dlq", "list", "--state", "queued")["jobs"] == listed, "dlq list is always the dead jobs"


def test_dlq_replay_queues_a_dead_job_again_and_a_worker_then_runs_it(
    run: Cli, tasks_app: Conveyor, tmp_path: Path
) -> None:
    marker = tmp_path / "marker"
    job_id = run.enqueue("fails_without_marker", "--args", json.dumps([str(marker)]))
    run_due_jobs(tasks_app)
    assert run.show(job_id)["state"] == "dead"
    marker.touch()

    replay = run.json("dlq", "replay", job_id)

    assert replay == {"replayed": [job_id], "errors": []}
    replayed = run.show(job_id)
    assert (replayed["state"], replayed["attempt"]) == ("queued", 0)
    assert run.jobs("--state", "dead") == []

    run_due_jobs(tasks_app)

    finished = run.show(job_id)
    assert (finished["state"], finished["result"]) == ("succeeded", "marker found")
    assert [record["outcome"] for record in finished["history"]] == ["failed", "succeeded"]


def test_dlq_replay_for_people_reports_the_count(run: Cli, tasks_app: Conveyor) -> None:
    job_id = run.enqueue("permanent_failure")
    run_due_jobs(tasks_app)

    result = run("dlq", "replay", job_id)

    assert result.exit_code == 0, result.output
    assert result.stdout == "replayed 1 job(s)\n"
    assert run.show(job_id)["state"] == "queued"


def test_dlq_replay_all_replays_every_dead_job(run: Cli, tasks_app: Conveyor) -> None:
    dead = {run.enqueue("permanent_failure") for _ in range(3)}
    succeeded = run.enqueue("noop", "--args", "[1]")
    run_due_jobs(tasks_app)
    queued = run.enqueue("noop", "--args", "[2]")
    assert {job["id"] for job in run.json("dlq", "list")["jobs"]} == dead

    result = run.json("dlq", "replay", "--all")

    assert set(result["replayed"]) == dead
    assert len(result["replayed"]) == 3
    assert result["errors"] == []
    assert run.json("dlq", "list")["jobs"] == []
    assert {job["id"] for job in run.jobs("--state", "queued")} == {*dead, queued}
    assert run.show(succeeded)["state"] == "succeeded"


def test_dlq_replay_all_can_be_limited_to_one_task(run: Cli, tasks_app: Conveyor, tmp_path: Path) -> None:
    permanent = run.enqueue("permanent_failure")
    marker_job = run.enqueue("fails_without_marker", "--args", json.dumps([str(tmp_path / "absent")]))
    run_due_jobs(tasks_app)

    result = run.json("dlq", "replay", "--all", "--task", "permanent_failure")

    assert result == {"replayed": [permanent], "errors": []}
    assert [job["id"] for job in run.json("dlq", "list")["jobs"]] == [marker_job]


def test_dlq_replay_all_with_no_dead_jobs_replays_nothing(run: Cli) -> None:
    assert run.json("dlq", "replay", "--all") == {"replayed": [], "errors": []}


@pytest.mark.parametrize("args", [[], ["--all", "JOB"]])
def test_dlq_replay_needs_job_ids_or_all_but_not_both(run: Cli, tasks_app: Conveyor, args: list[str]) -> None:
    dead = run.enqueue("permanent_failure")
    run_due_jobs(tasks_app)

    result = run("dlq", "replay", *[dead if arg == "JOB" else arg for arg in args])

    assert result.exit_code == 2
    assert "give job ids or --all, not both and not neither" in result.stderr
    assert run.show(dead)["state"] == "dead", "nothing was replayed"


def test_dlq_replay_of_a_job_that_is_not_dead_exits_3_and_says_why(run: Cli, tasks_app: Conveyor) -> None:
    queued = run.enqueue("noop", "--args", "[1]")

    result = run("dlq", "replay", queued)

    assert result.exit_code == 3
    message = flat(result.stderr)
    assert f"cannot retry job '{queued}': it is queued; only dead, cancelled jobs can be" in message
    assert result.stdout == "replayed 0 job(s)\n"
    assert run.show(queued)["state"] == "queued"


def test_dlq_replay_replays_what_it_can_and_exits_3_for_the_rest(run: Cli, tasks_app: Conveyor) -> None:
    dead = run.enqueue("permanent_failure")
    succeeded = run.enqueue("noop", "--args", "[1]")
    run_due_jobs(tasks_app)

    result = run("dlq", "replay", dead, succeeded, "no-such-job", "--json")

    assert result.exit_code == 3
    report = json.loads(result.stdout)
    assert report["replayed"] == [dead]
    assert report["errors"] == [
        f"cannot retry job '{succeeded}': it is succeeded; only dead, cancelled jobs can be",
        "no job with id 'no-such-job'",
    ]
    assert run.show(dead)["state"] == "queued"
    assert run.show(succeeded)["state"] == "succeeded"


# -- the database ---------------------------------------------------------------------------------


def test_db_upgrade_creates_the_schema_in_a_new_file(run: Cli) -> None:
    assert not database_path(run.database_url).exists()

    upgraded = run("db", "upgrade")
    current = run("db", "current")

    head = head_revision()
    assert upgraded.exit_code == 0, upgraded.output
    assert upgraded.stdout == f"schema at revision {head} (head {head})\n"
    assert {"conveyor_jobs", VERSION_TABLE} <= tables(run.database_url)
    assert current.exit_code == 0
    assert current.stdout == f"current: {head}\nhead:    {head}\n"
    assert run.json("db", "current") == {"current": head, "head": head, "up_to_date": True}


def test_db_upgrade_twice_changes_nothing(run: Cli) -> None:
    assert run("db", "upgrade").exit_code == 0

    again = run("db", "upgrade")

    assert again.exit_code == 0, again.output
    assert run.json("db", "current")["up_to_date"] is True


def test_db_current_on_an_empty_database_exits_4(run: Cli) -> None:
    result = run("db", "current")
    as_json = run("db", "current", "--json")

    assert result.exit_code == 4
    assert result.stdout == f"current: none (empty database)\nhead:    {head_revision()}\n"
    assert as_json.exit_code == 4
    assert json.loads(as_json.stdout) == {"current": None, "head": head_revision(), "up_to_date": False}


def test_db_downgrade_to_base_drops_the_schema(run: Cli) -> None:
    assert run("db", "upgrade").exit_code == 0

    downgraded = run("db", "downgrade", "base")
    current = run("db", "current")

    assert downgraded.exit_code == 0, downgraded.output
    assert downgraded.stdout == f"schema at revision base (head {head_revision()})\n"
    assert "conveyor_jobs" not in tables(run.database_url)
    assert current.exit_code == 4
    assert "none (empty database)" in current.stdout


@pytest.mark.parametrize("command", [["db", "upgrade", "--revision", "9999"], ["db", "downgrade", "9999"]])
def test_db_migrating_to_an_unknown_revision_is_bad_input(run: Cli, command: list[str]) -> None:
    assert run("db", "upgrade").exit_code == 0

    result = run(*command)

    assert result.exit_code == 2, result.output
    assert "Can't locate revision identified by '9999'" in flat(result.stderr)
    assert run.json("db", "current")["up_to_date"] is True, "the schema was left as it was"


def test_a_schema_newer_than_this_conveyor_makes_commands_exit_4(run: Cli) -> None:
    assert run("db", "upgrade").exit_code == 0
    with contextlib.closing(sqlite3.connect(database_path(run.database_url))) as connection, connection:
        connection.execute(f"UPDATE {VERSION_TABLE} SET version_num = '9999_from_the_future'")

    listed = run("jobs", "list")
    current = run("db", "current")
    upgraded = run("db", "upgrade")

    assert listed.exit_code == 4, listed.output
    message = flat(listed.stderr)
    assert "revision '9999_from_the_future'" in message
    assert "a newer Conveyor migrated it" in message
    assert current.exit_code == 4
    assert "current: 9999_from_the_future" in current.stdout
    assert upgraded.exit_code == 4, upgraded.output
    assert "a newer Conveyor migrated it" in flat(upgraded.stderr)


def test_a_file_that_is_not_a_database_exits_4(run: Cli) -> None:
    database_path(run.database_url).write_bytes(b"this is not an SQLite database, " * 8)

    result = run("jobs", "list")

    assert result.exit_code == 4, result.output
    assert "file is not a database" in flat(result.stderr)


def test_db_prune_deletes_finished_jobs_older_than_given(run: Cli, tasks_app: Conveyor) -> None:
    succeeded = run.enqueue("noop", "--args", "[1]")
    dead = run.enqueue("permanent_failure")
    run_due_jobs(tasks_app)
    queued = run.enqueue("noop", "--args", "[2]")
    scheduled = run.enqueue("noop", "--args", "[3]", "--delay", "3600")
    assert [run.show(job_id)["state"] for job_id in (succeeded, dead)] == ["succeeded", "dead"]

    kept = run.json("db", "prune", "--older-than", "3600")
    pruned = run.json("db", "prune", "--older-than", "0")
    for_people = run("db", "prune", "--older-than", "0")

    assert kept == {"deleted": 0}, "they finished less than an hour ago"
    assert pruned == {"deleted": 2}
    assert {job["id"] for job in run.jobs()} == {queued, scheduled}
    assert for_people.exit_code == 0
    assert for_people.stdout == "deleted 0 finished job(s)\n"


def test_db_prune_needs_older_than(run: Cli) -> None:
    result = run("db", "prune")

    assert result.exit_code == 2
    assert "Missing option '--older-than'" in result.stderr


def test_token_names_with_brackets_are_shown_as_they_are(run: Cli) -> None:
    # Before escaping, Rich's markup error came after the token was stored: its secret was lost.
    created = run("tokens", "create", "--name", "[/x] deploy bot", "--scope", "admin")
    listed = run("tokens", "list")

    assert created.exit_code == 0, created.output
    assert "([/x] deploy bot; admin)" in flat(created.stderr)
    secret = created.stdout.strip()
    assert secret
    assert "\n" not in secret
    assert listed.exit_code == 0, listed.output
    assert "[/x] deploy bot" in listed.stdout
    assert [token["name"] for token in run.json("tokens", "list")] == ["[/x] deploy bot"]


def _enqueue_chain(app: Conveyor, *steps: Step) -> Workflow:
    async def enqueue() -> Workflow:
        try:
            return await chain(*steps).enqueue(name="cli chain")
        finally:
            await app.close()

    return asyncio.run(enqueue())


def test_workflows_show_renders_the_state_the_result_and_every_step(run: Cli, tasks_app: Conveyor) -> None:
    noop = tasks_app.tasks["noop"]
    workflow = _enqueue_chain(tasks_app, noop.step(7), noop.step())
    run_due_jobs(tasks_app)

    result = run("workflows", "show", workflow.id)

    assert result.exit_code == 0, result.output
    out = flat(result.stdout)
    assert f"workflow {workflow.id} (cli chain): succeeded" in out
    assert "result: 7" in out
    for job in workflow.jobs:
        assert job.id in out


def test_workflows_show_wait_exits_1_unless_it_succeeded(run: Cli, tasks_app: Conveyor) -> None:
    failing = _enqueue_chain(tasks_app, tasks_app.tasks["permanent_failure"].step(), tasks_app.tasks["noop"].step())
    run_due_jobs(tasks_app)

    shown = run("workflows", "show", failing.id, "--wait", "--timeout", "5", "--json")

    assert shown.exit_code == 1
    body = json.loads(shown.stdout)
    assert (body["state"], body["counts"]) == ("failed", {"dead": 1, "cancelled": 1})
    assert body["jobs"][1]["error"]["type"] == "DependencyFailed"


def test_workflows_show_unknown_id_exits_3(run: Cli) -> None:
    result = run("workflows", "show", "no-such-workflow")

    assert result.exit_code == 3
    assert flat(result.stderr) == "error: no workflow with id 'no-such-workflow'"


# -- schedules -------------------------------------------------------------------------------


def test_schedules_list_shows_each_schedule_with_its_next_run_and_latest_job(run: Cli, tasks_app: Conveyor) -> None:
    now = datetime(2026, 1, 5, 8, 0, 0, 500_000, tzinfo=UTC)
    tasks_app.clock = lambda: now
    (tick_job,) = asyncio.run(_enqueue_due_ticks(tasks_app))

    listed = run.json("schedules", "list", "--app", APP)["schedules"]

    assert listed == [
        {
            "name": "every_second",
            "task": "every_second",
            "cron": "* * * * * *",
            "timezone": "UTC",
            "queue": "ticks",
            "priority": 0,
            "args": [],
            "kwargs": {},
            "missed": "catch_up",
            "catch_up_limit": 100,
            "grace_seconds": 600.0,
            "next_run_at": "2026-01-05T08:00:01+00:00",
            "last_tick_at": "2026-01-05T08:00:00+00:00",
            "last_job_id": tick_job.id,
        }
    ]


def test_schedules_list_for_people_is_a_table(run: Cli, tasks_app: Conveyor) -> None:
    result = run("schedules", "list", "--app", APP)

    assert result.exit_code == 0, result.output
    out = flat(result.stdout)
    assert out.startswith("1 schedules")
    for cell in ("every_second", "* * * * * *", "UTC", "ticks", "catch_up"):
        assert cell in out


def test_schedules_list_of_an_app_without_schedules_is_empty(run: Cli) -> None:
    assert run.json("schedules", "list") == {"schedules": []}


async def _enqueue_due_ticks(app: Conveyor) -> list[Job]:
    try:
        return await Scheduler(app, list(app.schedules.values())).enqueue_due()
    finally:
        await app.close()


def test_a_long_running_command_takes_its_start_up_objects_out_of_garbage_collection() -> None:
    threshold = gc.get_threshold()
    try:
        settle_heap()
        assert gc.get_freeze_count() > 10_000, "start-up objects (the imports) are frozen"
        assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, *threshold[1:])
        assert gc.get_count()[0] < 10, "collected just before freezing"
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
