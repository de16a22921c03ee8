"""The side effect every benchmark task has: one byte appended to the file named by ``BENCH_SINK``.

The harness counts completed jobs as the file's size, the same way for every system, instead of
trusting logs or a job table. ``O_APPEND`` writes of one byte are atomic, so any number of worker
processes and threads can share the file. Imported by worker processes: keep it light.
"""

from __future__ import annotations

import os

_fd: int | None = None
_pid: int | None = None


def mark() -> None:
    """Record one finished job."""
    global _fd, _pid  # noqa: PLW0603 - one descriptor per process, opened on first use
    pid = os.getpid()
    if _fd is None or _pid != pid:
        _fd = os.open(os.environ["BENCH_SINK"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        _pid = pid
    os.write(_fd, b".")
