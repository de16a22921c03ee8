"""Several worker processes under one command: ``conveyor worker --processes N``.

The command imports the app and everything a worker runs on once, then forks the workers: each
starts with every module already loaded, in milliseconds rather than a second, and all of them
start claiming together. Started as separate commands on a busy machine, the first to finish
its imports took the lion's share of the work while the others were still importing.

The parent process only supervises:

- A stop (SIGTERM or SIGINT) reaches each worker through a pipe of its own: the first asks every
  worker to finish its running jobs, a second to hand them back at once, as for one worker. A
  signal that reached the workers directly as well (Ctrl+C signals the terminal's whole process
  group; systemd's default ``KillMode`` signals every process of the unit) counts once, not twice.
- A worker killed by a signal (the kernel's out-of-memory killer, an operator's SIGKILL, a crash
  in native code) is replaced after a pause. A worker that exits by itself unasked has judged its
  own failure (a setting it cannot use, a database it cannot reach at start, an error escaping the
  engine): every copy would fail alike, so the whole command stops, with that worker's exit code,
  and leaves restarting to whatever runs it (systemd, Kubernetes).
- A worker whose parent is gone (killed outright) finds its pipe closed and stops as on SIGTERM.
- On PostgreSQL, one idle worker at a time listens for new jobs (see ``ListeningTurn``).

Unix only: the workers are forked, which is what makes them start at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gc
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import structlog

logger = structlog.get_logger("conveyor.worker")

GRACEFUL = b"g"
"""Sent down a worker's pipe: stop claiming, let running jobs finish."""
IMMEDIATE = b"i"
"""Sent down a worker's pipe: stop now, handing running jobs back."""

_STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})

RESTART_DELAY_SECONDS = 1.0
"""Pause before a killed worker is replaced: one killed again and again costs a fork a second, not a busy CPU."""


class ListeningTurn:
    """Which idle worker of a command listens for new jobs: one at a time, made before the forks.

    With every worker listening, each enqueue woke every worker process and the server backend
    serving each, all of them claimed the job, and all but one came back empty: with three
    processes on two cores, one job's enqueue to completion took a median of 2.5 ms (1.7 with
    one listening). A worker holds the turn while it waits for work and still has room; it
    hands it on once it has plenty to run (a claim that came back full, or half its concurrency
    busy). The turn is a lock on a file the workers share, which the kernel frees when its holder
    dies; giving it up (and any full claim) writes to a pipe that waiting workers watch, so the
    next one claims at once. A worker without the turn otherwise looks for jobs every poll
    interval.
    """

    def __init__(self) -> None:
        self._file = tempfile.TemporaryFile()  # noqa: SIM115 - open for the command's whole life
        self._poke_read, self._poke_write = os.pipe()
        os.set_blocking(self._poke_read, False)
        os.set_blocking(self._poke_write, False)
        self.held = False

    def take(self) -> bool:
        """Take the turn if no other worker holds it; return whether this one holds it now."""
        if not self.held:
            try:
                fcntl.lockf(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except (BlockingIOError, PermissionError):  # EAGAIN or EACCES: another worker holds it
                return False
            self.held = True
        return True

    def give_up(self) -> None:
        """Let another worker listen, and wake one that waits so that it claims what is due."""
        if self.held:
            fcntl.lockf(self._file, fcntl.LOCK_UN)
            self.held = False
            self.poke()

    def poke(self) -> None:
        """Wake a waiting worker: more jobs are due than this one took."""
        with contextlib.suppress(BlockingIOError):  # a full pipe holds wake-ups enough
            os.write(self._poke_write, b"p")

    def forget_pokes(self) -> None:
        """Drop wake-ups from before this worker last claimed: it has seen what they announced."""
        with contextlib.suppress(BlockingIOError):
            while os.read(self._poke_read, 512):
                pass

    def close(self) -> None:
        self._file.close()
        os.close(self._poke_read)
        os.close(self._poke_write)

    async def wait_for_poke(self, timeout: float, news: asyncio.Event) -> None:
        """Return when woken by another worker, when ``news`` is set, or after ``timeout``."""
        loop = asyncio.get_running_loop()
        poked = loop.create_future()

        def on_poke() -> None:
            try:
                os.read(self._poke_read, 1)
            except BlockingIOError:  # another worker took this wake-up
                return
            if not poked.done():
                poked.set_result(None)

        loop.add_reader(self._poke_read, on_poke)
        news_set = asyncio.ensure_future(news.wait())
        try:
            await asyncio.wait({poked, news_set}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            loop.remove_reader(self._poke_read)
            news_set.cancel()


class Stoppable(Protocol):
    @property
    def stopping(self) -> bool: ...

    def stop(self, *, immediate: bool = False) -> None: ...


@dataclass(slots=True)
class _Process:
    index: int
    control: int
    """The write end of the pipe that this worker reads its stop requests from."""


class Supervisor:
    """Forks ``count`` workers, each running ``run_worker(index, control_fd)`` and exiting with its return value."""

    def __init__(
        self,
        count: int,
        run_worker: Callable[[int, int], int],
        *,
        restart_delay: float = RESTART_DELAY_SECONDS,
        turn: ListeningTurn | None = None,
    ) -> None:
        self.count = count
        self._run_worker = run_worker
        self._restart_delay = restart_delay
        self._turn = turn
        self._processes: dict[int, _Process] = {}
        self._signals = 0
        self._stopping = False
        self._exit_code = 0

    def run(self) -> int:
        """Start the workers, keep them running until a stop, and return the command's exit code."""
        # What start-up made is shared with the workers and never collected: left to the
        # collector, its first walk in each worker would copy every page it touches.
        gc.freeze()
        previous = {signum: signal.signal(signum, self._on_signal) for signum in _STOP_SIGNALS}
        try:
            for index in range(self.count):
                if self._stopping:  # a stop that came while the first workers started
                    break
                self._start(index)
            while self._processes:
                pid, status = os.wait()
                ended = self._processes.pop(pid, None)
                if ended is not None:
                    self._ended(pid, ended, status)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        return self._exit_code

    def _start(self, index: int) -> None:
        read_end, write_end = os.pipe()
        # Held back across the fork: a stop signal arriving in between would otherwise run this
        # process's handler in the worker. Each side takes it once its own handlers are in place.
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            pid = os.fork()
            if pid == 0:  # pragma: no cover - runs in the forked worker, which ends by os._exit
                os._exit(self._in_worker(index, read_end, write_end))
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        os.close(read_end)
        self._processes[pid] = _Process(index=index, control=write_end)
        logger.info("worker.process_started", pid=pid, index=index)

    def _in_worker(self, index: int, read_end: int, write_end: int) -> int:  # pragma: no cover - forked
        # The parent's handlers would forward signals to workers this copy of it does not own;
        # the worker installs its own on its event loop.
        for signum in _STOP_SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        os.close(write_end)
        # Another worker's pipe held open here would never report that worker's parent gone.
        for other in self._processes.values():
            os.close(other.control)
        try:
            return self._run_worker(index, read_end)
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # noqa: BLE001 - whatever ends the worker, the process must end here
            traceback.print_exc()
            return 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()

    def _ended(self, pid: int, process: _Process, status: int) -> None:
        os.close(process.control)
        if self._turn is not None:
            # The kernel freed the listening turn if this worker held it: a waiting one takes it.
            self._turn.poke()
        code = os.waitstatus_to_exitcode(status)
        killed_by = -code if code < 0 else None
        # As a shell reports it: a process killed by signal N exited with 128 + N.
        code = 128 + killed_by if killed_by is not None else code
        if self._stopping:
            logger.info("worker.process_stopped", pid=pid, index=process.index, exit_code=code)
            self._exit_code = self._exit_code or code
            return
        if killed_by is None:
            logger.error("worker.process_failed", pid=pid, index=process.index, exit_code=code)
            self._exit_code = code or 1
            self._stopping = True
            self._tell_all(GRACEFUL)
            return
        logger.error("worker.process_killed", pid=pid, index=process.index, signal=signal.Signals(killed_by).name)
        time.sleep(self._restart_delay)
        if not self._stopping:
            self._start(process.index)

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._signals += 1
        self._stopping = True
        logger.info("worker.signal", signal=signal.Signals(signum).name, processes=len(self._processes))
        self._tell_all(GRACEFUL if self._signals == 1 else IMMEDIATE)

    def _tell_all(self, request: bytes) -> None:
        for process in self._processes.values():
            # A worker that ended and is not yet reaped has no reader left: nothing to tell it.
            with contextlib.suppress(OSError):
                os.write(process.control, request)


def follow_supervisor(control: int, worker: Stoppable) -> None:
    """In a forked worker: stop ``worker`` when the supervisor says, or when the supervisor is gone.

    Call from within the worker's event loop. A request to stop gracefully that comes after the
    worker began stopping (it got the same signal directly) changes nothing.
    """
    loop = asyncio.get_running_loop()
    os.set_blocking(control, False)

    def on_request() -> None:
        try:
            request = os.read(control, 64)
        except BlockingIOError:
            return
        if not request:  # end of file: the supervisor is gone
            loop.remove_reader(control)
            request = GRACEFUL
        if IMMEDIATE in request:
            worker.stop(immediate=True)
        elif not worker.stopping:
            worker.stop()

    loop.add_reader(control, on_request)
