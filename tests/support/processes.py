"""Real worker processes for tests: started with the CLI, watched through their JSON logs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]


def worker_env(database_url: str, **settings: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("CONVEYOR_")}
    env.update(
        {
            "CONVEYOR_DATABASE_URL": database_url,
            "CONVEYOR_LOG_FORMAT": "json",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        }
    )
    if "CONVEYOR_TEST_EFFECTS" in os.environ:
        env["CONVEYOR_TEST_EFFECTS"] = os.environ["CONVEYOR_TEST_EFFECTS"]
    env.update({f"CONVEYOR_{key.upper()}": value for key, value in settings.items()})
    return env


class LoggedProcess:
    """A ``python -m conveyor ...`` child process with its output in a log file of JSON lines."""

    def __init__(self, log_path: Path, command: Sequence[str], env: dict[str, str]) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "conveyor", *command],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def events(self) -> list[dict[str, Any]]:
        found = []
        for line in self.log_text().splitlines():
            if line.startswith("{"):
                try:
                    found.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return found

    def wait_for_event(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.events():
                if predicate(event):
                    return event
            if self.process.poll() is not None:
                raise AssertionError(f"process exited with {self.process.returncode}:\n{self.log_text()}")
            time.sleep(0.02)
        raise AssertionError(f"no matching event within {timeout}s:\n{self.log_text()[-4000:]}")

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, then the exit code (a graceful stop is 0)."""
        if self.process.poll() is None:
            self.process.terminate()
        try:
            return self.process.wait(timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        self._log.close()


class WorkerProcess(LoggedProcess):
    """``conveyor worker`` on the test tasks (``app_path``: another app of them)."""

    def __init__(
        self,
        log_path: Path,
        database_url: str,
        args: Sequence[str] = (),
        *,
        app_path: str = "tests.support.tasks:app",
        **settings: str,
    ) -> None:
        command = ["worker", "--app", app_path, *args]
        super().__init__(log_path, command, worker_env(database_url, **settings))

    def wait_started(self, timeout: float = 120) -> None:
        self.wait_for_event(lambda event: event.get("event") == "worker.started", timeout)
