"""CPU-bound tasks, each attempt in a process of its own slot.

Each slot is a one-process pool. A crash (segfault, ``os._exit``) or a timeout then ends only
the attempt that caused it: the slot's process is killed and replaced, and no other job is
blamed, which a shared pool could not promise.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import multiprocessing
import os
import signal
import traceback
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from pydantic_core import to_jsonable_python

from conveyor.jobs import JobError


class ProcessCrashedError(Exception):
    """The process running a CPU task died before it returned."""


class RemoteFailure(Exception):  # noqa: N818 - not an error of its own: carries the task's across processes
    """The task raised in the child process; its details, and whether it may be retried."""

    def __init__(self, error: JobError, retryable: bool) -> None:
        super().__init__(error.message)
        self.error = error
        self.retryable = retryable


def _resolve(module: str, qualname: str) -> Any:
    target: Any = importlib.import_module(module)
    for part in qualname.split("."):
        target = getattr(target, part)
    return target


def run_in_child(module: str, qualname: str, args: list[Any], kwargs: dict[str, Any], context: Any) -> tuple[str, Any]:
    """Runs in the pool's process: find the task by where it is defined, call it, report back."""
    from conveyor.tasks import is_retryable  # noqa: PLC0415 - only needed in the child

    task = _resolve(module, qualname)
    try:
        typed_args, typed_kwargs = task.from_json_arguments(args, kwargs)
        if task.context_parameter:
            typed_kwargs[task.context_parameter] = context
        result = task.fn(*typed_args, **typed_kwargs)
        return "ok", to_jsonable_python(result)
    except Exception as exc:  # noqa: BLE001 - every failure is reported to the parent as data
        error = JobError(type=type(exc).__name__, message=str(exc), traceback=traceback.format_exc())
        return "error", (error.to_json(), is_retryable(task, exc))


def _configure_child(log_level: str) -> None:
    """Set up a pool process: the parent's log pipeline, and deaf to SIGINT and SIGTERM.

    Ctrl+C or a SIGTERM sent to the whole process group reaches these processes too; the
    worker decides what happens to their attempts (finish in the grace period, or be killed
    and handed back), so they must not die on their own first.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from conveyor.log import configure_logging  # noqa: PLC0415 - runs in the child only
    from conveyor.settings import Settings  # noqa: PLC0415

    configure_logging(Settings(log_level=log_level))


class _Slot:
    def __init__(self, log_level: str) -> None:
        context = multiprocessing.get_context("spawn")
        self.executor = ProcessPoolExecutor(
            max_workers=1, mp_context=context, initializer=_configure_child, initargs=(log_level,)
        )
        self.pid: int | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.pid = await loop.run_in_executor(self.executor, os.getpid)

    def kill(self) -> None:
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        self.executor.shutdown(wait=False, cancel_futures=True)


class CpuPool:
    """Up to ``size`` CPU-bound attempts at once, each in its own process."""

    def __init__(self, size: int, *, log_level: str = "INFO") -> None:
        self.size = size
        self._log_level = log_level
        self._idle: list[_Slot] = []
        self._busy: set[_Slot] = set()
        self._available = asyncio.Semaphore(size)

    async def run(
        self,
        module: str,
        qualname: str,
        args: list[Any],
        kwargs: dict[str, Any],
        context: Any,
        timeout: float | None,
    ) -> Any:
        """The task's JSON result; raises ``RemoteFailure``, ``ProcessCrashedError`` or ``TimeoutError``."""
        async with self._available:
            slot = self._idle.pop() if self._idle else _Slot(self._log_level)
            self._busy.add(slot)
            healthy = False
            try:
                if slot.pid is None:
                    await slot.start()
                loop = asyncio.get_running_loop()
                future = loop.run_in_executor(slot.executor, run_in_child, module, qualname, args, kwargs, context)
                status, payload = await asyncio.wait_for(future, timeout)
                healthy = True
            except BrokenProcessPool as exc:
                raise ProcessCrashedError(
                    "the process running this CPU task died (a crash, os._exit, or out of memory)"
                ) from exc
            finally:
                self._busy.discard(slot)
                if healthy:
                    self._idle.append(slot)
                else:
                    # Timed out, cancelled or crashed: the process may still be busy with this
                    # attempt, so it is ended rather than reused.
                    slot.kill()
        if status == "error":
            error, retryable = payload
            raise RemoteFailure(JobError.from_json(error) or JobError("Error", ""), retryable)
        return payload

    def close(self) -> None:
        for slot in [*self._idle, *self._busy]:
            slot.kill()
        self._idle.clear()
        self._busy.clear()
