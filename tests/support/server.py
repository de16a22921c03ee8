"""A real ``conveyor serve`` for tests: a child process on loopback, found through its JSON log.

The server listens on port 0, so the kernel picks a free port with no race between choosing
it and binding it; uvicorn logs the port it got, and ``wait_ready`` reads it from there.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx

from tests.support.processes import REPO_ROOT, LoggedProcess, worker_env

APP = "tests.support.tasks:app"
HOST = "127.0.0.1"
_LISTENING = re.compile(r"^Uvicorn running on http://127\.0\.0\.1:(?P<port>\d+) ")


def run_cli(
    database_url: str,
    *args: str,
    timeout: float = 60,
    extra_env: Mapping[str, str] | None = None,
    **settings: str,
) -> subprocess.CompletedProcess[str]:
    """``conveyor ARGS`` in a child process on the test's database; never raises on its exit code."""
    return subprocess.run(
        [sys.executable, "-m", "conveyor", *args],
        env={**worker_env(database_url, **settings), **(extra_env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO_ROOT,
        check=False,
    )


class ServerProcess(LoggedProcess):
    """``conveyor serve --host 127.0.0.1 --port 0`` in a child process, its log in a file."""

    def __init__(self, log_path: Path, database_url: str, args: Sequence[str] = (), **settings: str) -> None:
        command = ["serve", "--app", APP, "--host", HOST, "--port", "0", *args]
        super().__init__(log_path, command, worker_env(database_url, **settings))
        self.base_url: str | None = None

    def log_tail(self, lines: int = 40) -> str:
        """The end of the log without access lines: what to read when a test fails."""
        kept = [line for line in self.log_text().splitlines() if '"uvicorn.access"' not in line]
        return "\n".join(kept[-lines:])

    def _port(self) -> int | None:
        for event in self.events():
            match = _LISTENING.match(str(event.get("event", "")))
            if match:
                return int(match["port"])
        return None

    async def wait_ready(self, timeout: float = 30) -> str:
        """Wait for the bound port in the log, then for ``GET /health`` to answer 200; return the base URL."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with httpx.AsyncClient(timeout=httpx.Timeout(1.0)) as client:
            while loop.time() < deadline:
                if self.process.poll() is not None:
                    raise AssertionError(f"server exited with {self.process.returncode}:\n{self.log_text()[-4000:]}")
                port = self._port()
                if port is not None:
                    try:
                        response = await client.get(f"http://{HOST}:{port}/health")
                    except httpx.TransportError:
                        response = None
                    if response is not None and response.status_code == 200:
                        self.base_url = f"http://{HOST}:{port}"
                        return self.base_url
                await asyncio.sleep(0.05)
        raise AssertionError(f"server not ready within {timeout}s:\n{self.log_text()[-4000:]}")

    def client(self, token: str | None = None, *, timeout: float = 10) -> httpx.AsyncClient:
        """A client for this server; every call times out (long-polls pass a longer timeout per call)."""
        assert self.base_url is not None, "wait_ready() first"
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout),
            # Idle connections are dropped well before uvicorn's 5 s keep-alive timeout closes them,
            # so a request never races the server closing the connection it was sent on.
            limits=httpx.Limits(max_connections=50, max_keepalive_connections=50, keepalive_expiry=2),
        )
