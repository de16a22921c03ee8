"""``python -m conveyor`` as a real process: the flows that need a real worker process to run the
job, and the checks that only a fresh interpreter can make (the ``--app`` module imported after
``--database-url`` is set). ``--wait`` is the wait: the CLI polls the job until it finishes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import pytest
from tests.support.processes import WorkerProcess, worker_env

APP = "tests.support.tasks:app"
WAIT = ["--wait", "--timeout", "60"]
"""Long enough for a loaded machine; a broken worker fails the test instead of hanging it."""


@pytest.fixture(scope="module", autouse=True)
def _bytecode_cache_for_children(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Let child interpreters cache compiled modules in a temporary folder (never the source tree).

    Where PYTHONDONTWRITEBYTECODE is set, every `python -m conveyor` would otherwise compile
    some 600 modules again, seconds per process.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("PYTHONDONTWRITEBYTECODE", raising=False)
        patch.setenv("PYTHONPYCACHEPREFIX", str(tmp_path_factory.mktemp("pycache")))
        yield


def conveyor(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m conveyor ARGS`` with this test's database and the repo on PYTHONPATH."""
    env = worker_env(database_url)
    env["COLUMNS"] = "200"  # Rich wraps at 80 columns off a terminal
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE"):  # plain text, whatever the CI sets
        env.pop(name, None)
    return subprocess.run(
        [sys.executable, "-m", "conveyor", *args],
        env=env,
        cwd=Path.cwd(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def worker(tmp_path: Path, database_url: str) -> Iterator[WorkerProcess]:
    """`conveyor worker --app tests.support.tasks:app` polling often; not awaited: `--wait` covers its start."""
    process = WorkerProcess(
        tmp_path / "worker.log", database_url, poll_interval_seconds="0.05", shutdown_grace_seconds="1"
    )
    try:
        yield process
    finally:
        try:
            process.stop(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def test_python_m_conveyor_runs_the_cli(database_url: str) -> None:
    result = conveyor(database_url, "--version")

    assert result.returncode == 0, result.stderr
    assert result.stdout == f"conveyor, version {version('conveyor')}\n"


@pytest.mark.parametrize("command", [["enqueue", "--app", APP, "noop", "--args", "[1]"], ["worker", "--app", APP]])
def test_app_module_meeting_a_bad_database_url_exits_2_and_touches_no_database(
    database_url: str, tmp_path: Path, command: list[str]
) -> None:
    # In a fresh process the --app module is imported after --database-url is set, so its own
    # Conveyor() is the one that meets the bad URL.
    result = conveyor(database_url, "--database-url", "mysql://x", *command)

    assert result.returncode == 2, result.stderr
    message = " ".join(result.stderr.split())
    assert "unsupported database scheme 'mysql'" in message
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "conveyor.db").exists(), "the database from the environment was not used"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--queues", ""], "Invalid value for --queues: give at least one queue name"),
        (["--queues", " , "], "Invalid value for --queues: give at least one queue name"),
        (["--concurrency", "0"], "Invalid value for '--concurrency' / '-c': 0 is not in the range 1<=x<=10000"),
        (["--processes", "0"], "Invalid value for '--processes' / '-p': 0 is not in the range 1<=x<=256"),
        (
            ["--processes", "3", "--metrics-port", "65534"],
            "Invalid value for --metrics-port: worker 2 would serve on 65536, past 65535",
        ),
    ],
)
def test_worker_bad_options_are_a_usage_error(database_url: str, options: list[str], message: str) -> None:
    result = conveyor(database_url, "worker", "--app", APP, *options)

    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "worker.started" not in result.stderr + result.stdout


@pytest.mark.integration
def test_enqueue_wait_prints_the_result_once_a_worker_ran_the_job(database_url: str, worker: WorkerProcess) -> None:
    result = conveyor(database_url, "enqueue", "--app", APP, "noop", "--args", "[4242]", *WAIT)

    assert result.returncode == 0, result.stderr + worker.log_path.read_text()
    rows = {
        line.split("│")[1].strip(): line.split("│")[2].strip() for line in result.stdout.splitlines() if "│" in line
    }
    assert rows["state"] == "succeeded"
    assert rows["result"] == "4242"
    assert rows["attempt"] == "1/5"


@pytest.mark.integration
def test_enqueue_wait_exits_1_when_the_job_ends_dead(database_url: str, worker: WorkerProcess) -> None:
    result = conveyor(database_url, "enqueue", "--app", APP, "always_fails", "--args", '["boom"]', *WAIT, "--json")

    assert result.returncode == 1, result.stderr + worker.log_path.read_text()
    job = json.loads(result.stdout)
    assert job["state"] == "dead"
    assert job["attempt"] == 3
    assert (job["error"]["type"], job["error"]["message"]) == ("RuntimeError", "boom")
    assert [record["outcome"] for record in job["history"]] == ["failed"] * 3


@pytest.mark.integration
def test_dead_job_replayed_from_the_dlq_is_run_to_success_by_the_worker(
    database_url: str, worker: WorkerProcess, tmp_path: Path
) -> None:
    marker = tmp_path / "marker"
    first = conveyor(
        database_url,
        "enqueue",
        "--app",
        APP,
        "fails_without_marker",
        "--args",
        json.dumps([str(marker)]),
        *WAIT,
        "--json",
    )
    assert first.returncode == 1, first.stderr + worker.log_path.read_text()
    job_id = json.loads(first.stdout)["id"]
    assert json.loads(first.stdout)["state"] == "dead"
    marker.touch()

    replay = conveyor(database_url, "dlq", "replay", job_id, "--json")
    finished = conveyor(database_url, "jobs", "show", job_id, *WAIT, "--json")

    assert replay.returncode == 0, replay.stderr
    assert json.loads(replay.stdout) == {"replayed": [job_id], "errors": []}
    assert finished.returncode == 0, finished.stderr + worker.log_path.read_text()
    job = json.loads(finished.stdout)
    assert (job["state"], job["result"], job["attempt"]) == ("succeeded", "marker found", 1)
    assert [record["outcome"] for record in job["history"]] == ["failed", "succeeded"]


@pytest.mark.integration
def test_worker_with_no_schedules_runs_jobs_but_makes_no_ticks(tmp_path: Path, database_url: str) -> None:
    # tests.support.tasks schedules `every_second` on the ticks queue, which this worker serves.
    worker = WorkerProcess(tmp_path / "worker.log", database_url, ["--queues", "ticks", "--no-schedules"])
    try:
        ran = conveyor(database_url, "enqueue", "--app", APP, "noop", "--args", "[1]", "--queue", "ticks", *WAIT)
        ticks = conveyor(database_url, "jobs", "list", "--task", "every_second", "--json")
    finally:
        assert worker.stop() == 0

    assert ran.returncode == 0, ran.stderr + worker.log_text()
    assert json.loads(ticks.stdout)["jobs"] == []
    assert "scheduler.started" not in worker.log_text()
