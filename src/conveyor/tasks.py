"""Tasks: registered functions, and the checks that keep bad jobs out of the database."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar

from pydantic import TypeAdapter, ValidationError
from pydantic_core import PydanticSerializationError

from conveyor.backoff import DEFAULT_BACKOFF, BackoffFunction
from conveyor.context import JobContext
from conveyor.errors import PermanentError, TaskArgumentsError
from conveyor.jobs import Job, NewJob
from conveyor.limits import RateLimit
from conveyor.workflows import Step

if TYPE_CHECKING:
    from conveyor.app import Conveyor

P = ParamSpec("P")
R = TypeVar("R")

_ANY: TypeAdapter[Any] = TypeAdapter(Any)


class _Input:
    """Stands for a workflow step's input (the result it receives) while its own arguments are checked."""

    def __repr__(self) -> str:
        return "<the previous step's result>"


_INPUT = _Input()


@dataclass(frozen=True, slots=True)
class TaskOptions:
    """Per-task defaults, which a single enqueue may override."""

    queue: str = "default"
    priority: int = 0
    max_attempts: int | None = None
    """None means the app's ``max_attempts`` setting."""
    timeout: float | None = None
    """Seconds one attempt may run; None means no limit."""
    backoff: BackoffFunction = DEFAULT_BACKOFF
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    cpu: bool = False
    unique_key: Callable[..., str] | None = None
    """Called with the job's arguments; jobs with the same key run one at a time (see unique_key below)."""
    rate_limit: RateLimit | None = None
    """At most this many of its attempts start per second, minute or hour, on all workers together."""


@dataclass(frozen=True, slots=True)
class EnqueueOptions:
    """What one enqueue can say beyond the task's arguments."""

    queue: str | None = None
    priority: int | None = None
    delay: float | timedelta | None = None
    run_at: datetime | None = None
    max_attempts: int | None = None
    timeout: float | timedelta | None = None
    idempotency_key: str | None = None
    correlation_id: str | None = None
    unique_key: str | None = None
    """While a job with this key is unfinished, enqueueing another returns that job instead."""


# Frozen, so one instance serves every enqueue that gives no options.
NO_OPTIONS = EnqueueOptions()


def _problems_from(error: ValidationError, where: str) -> list[str]:
    problems = []
    for item in error.errors(include_url=False):
        loc = "".join(f"[{part!r}]" for part in item["loc"])
        problems.append(f"{where}{loc}: {item['msg']}")
    return problems


_CONTEXT_NAMES = {"JobContext", "conveyor.JobContext", "JobContext|None", "conveyor.JobContext|None"}


def _is_context(annotation: Any) -> bool:
    if annotation is JobContext:
        return True
    if isinstance(annotation, str):
        return annotation.replace(" ", "") in _CONTEXT_NAMES
    return JobContext in typing.get_args(annotation)


def _context_parameter(fn: Callable[..., Any], hints: Mapping[str, Any]) -> str | None:
    for name, parameter in inspect.signature(fn).parameters.items():
        if _is_context(hints.get(name, parameter.annotation)):
            return name
    return None


def _adapter(annotation: Any) -> TypeAdapter[Any]:
    if annotation is inspect.Parameter.empty:
        return _ANY
    try:
        return TypeAdapter(annotation)
    except Exception:  # noqa: BLE001 - pydantic cannot model every annotation; such values only need to be JSON
        return _ANY


class Task(Generic[P, R]):
    """A function registered with ``@app.task``. Call it directly, or ``await task.enqueue(...)``.

    Arguments are validated against the function's annotations (pydantic) when the job is
    enqueued and stored as JSON; the worker turns them back into the annotated types, so a
    task may take a ``datetime`` or a pydantic model and receive one.
    """

    def __init__(self, app: Conveyor, fn: Callable[P, R], name: str, options: TaskOptions) -> None:
        self.app = app
        self.fn = fn
        self.name = name
        self.options = options
        self.is_async = inspect.iscoroutinefunction(fn)
        try:
            hints = typing.get_type_hints(fn, include_extras=True)
        except Exception:  # noqa: BLE001 - unresolvable forward references: fall back to raw annotations
            hints = {}
        self.context_parameter = _context_parameter(fn, hints)
        signature = inspect.signature(fn)
        self.signature = signature.replace(
            parameters=[p for p in signature.parameters.values() if p.name != self.context_parameter]
        )
        self._adapters = {
            name: _adapter(hints.get(name, parameter.annotation))
            for name, parameter in self.signature.parameters.items()
        }
        variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        self._requires_arguments = any(
            p.default is inspect.Parameter.empty and p.kind not in variadic for p in self.signature.parameters.values()
        )
        self._var_keyword = next(
            (p.name for p in self.signature.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD), None
        )
        self.__doc__ = fn.__doc__
        self.__name__ = getattr(fn, "__name__", name)
        self.__qualname__ = getattr(fn, "__qualname__", name)
        self.__module__ = fn.__module__
        self.__wrapped__ = fn

    def __repr__(self) -> str:
        return f"<Task {self.name} queue={self.options.queue}>"

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run the function here and now, as plain Python (handy in tests)."""
        return self.fn(*args, **kwargs)

    # -- arguments ----------------------------------------------------------------------

    def _convert(
        self, args: Sequence[Any], kwargs: Mapping[str, Any], *, to_json: bool
    ) -> tuple[list[Any], dict[str, Any]]:
        if not args and not kwargs and not self._requires_arguments:
            # Nothing to bind, check or convert (a task called bare): skip the signature machinery.
            return [], {}
        problems: list[str] = []
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TaskArgumentsError(
                f"bad arguments for task {self.name!r}", self._binding_problems(args, kwargs) or [str(exc)]
            ) from None
        for name, value in bound.arguments.items():
            kind = self.signature.parameters[name].kind
            adapter = self._adapters[name]
            if kind is inspect.Parameter.VAR_POSITIONAL:
                items = list(enumerate(value))
            elif kind is inspect.Parameter.VAR_KEYWORD:
                items = list(value.items())
            else:
                items = [(None, value)]
            converted: dict[Any, Any] = {}
            for key, item in items:
                where = name if key is None else f"{name}[{key!r}]"
                if item is _INPUT:
                    converted[key] = item  # checked when the worker revives it, once it exists
                    continue
                try:
                    typed = adapter.validate_python(item)
                    converted[key] = adapter.dump_python(typed, mode="json") if to_json else typed
                except ValidationError as exc:
                    problems.extend(_problems_from(exc, where))
                except PydanticSerializationError:
                    problems.append(f"{where}: a {type(item).__name__} is not JSON-serialisable")
            if kind is inspect.Parameter.VAR_POSITIONAL:
                bound.arguments[name] = tuple(converted[index] for index, _ in items)
            elif kind is inspect.Parameter.VAR_KEYWORD:
                bound.arguments[name] = {key: converted[key] for key, _ in items}
            elif None in converted:
                bound.arguments[name] = converted[None]
        if problems:
            raise TaskArgumentsError(f"bad arguments for task {self.name!r}", problems)
        # Keep the caller's split: what came by keyword stays a keyword (bound.args would move
        # keywords of positional-or-keyword parameters into args).
        by_keyword = {name: value for name, value in bound.arguments.items() if name in kwargs}
        if (varkw := self._var_keyword) is not None and varkw in bound.arguments:
            by_keyword.update(bound.arguments[varkw])
        return list(bound.args)[: len(args)], by_keyword

    def _binding_problems(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> list[str]:
        """Every way the arguments miss the signature (``Signature.bind`` stops at the first)."""
        kinds = inspect.Parameter
        parameters = list(self.signature.parameters.values())
        positional = [p for p in parameters if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD)]
        takes_varargs = any(p.kind is kinds.VAR_POSITIONAL for p in parameters)
        takes_varkw = any(p.kind is kinds.VAR_KEYWORD for p in parameters)
        problems = []
        if len(args) > len(positional) and not takes_varargs:
            problems.append(f"takes {len(positional)} positional argument(s) but {len(args)} were given")
        filled = {p.name for p in positional[: len(args)]}
        by_name = {p.name: p for p in parameters}
        for name in kwargs:
            parameter = by_name.get(name)
            if parameter is None or parameter.kind in (kinds.VAR_POSITIONAL, kinds.VAR_KEYWORD):
                if not takes_varkw:
                    problems.append(f"unexpected keyword argument {name!r}")
            elif parameter.kind is kinds.POSITIONAL_ONLY:
                problems.append(f"{name!r} is positional-only; pass it in args")
            elif name in filled:
                problems.append(f"{name!r} is given both by position and by keyword")
            else:
                filled.add(name)
        for parameter in parameters:
            required = parameter.default is kinds.empty and parameter.kind not in (
                kinds.VAR_POSITIONAL,
                kinds.VAR_KEYWORD,
            )
            if required and parameter.name not in filled:
                problems.append(f"missing required argument {parameter.name!r}")
        return problems

    def to_json_arguments(
        self, args: Sequence[Any], kwargs: Mapping[str, Any], *, takes_input: bool = False
    ) -> tuple[list[Any], dict[str, Any]]:
        """Check arguments against the signature and annotations; return them as JSON values.

        ``takes_input``: a workflow step whose first positional argument will be the result of
        what it follows; the rest are checked now, that one when it arrives.
        """
        if not takes_input:
            return self._convert(args, kwargs, to_json=True)
        try:
            json_args, json_kwargs = self._convert((_INPUT, *args), kwargs, to_json=True)
        except TaskArgumentsError as exc:
            raise TaskArgumentsError(
                str(exc), [*exc.problems, "(as a workflow step it receives the previous result as its first argument)"]
            ) from None
        return json_args[1:], json_kwargs

    def from_json_arguments(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> tuple[list[Any], dict[str, Any]]:
        """Turn stored JSON arguments back into the annotated types for the call."""
        if not args and not kwargs:
            # Nothing to revive (checked when enqueued); a missing argument still fails the call.
            return [], {}
        return self._convert(args, kwargs, to_json=False)

    def arguments_schema(self) -> dict[str, Any]:
        """A JSON schema of the task's keyword arguments (what an HTTP client may send)."""
        properties: dict[str, Any] = {}
        required: list[str] = []
        for name, parameter in self.signature.parameters.items():
            if parameter.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
                continue
            try:
                properties[name] = self._adapters[name].json_schema()
            except Exception:  # noqa: BLE001 - a type without a schema is still accepted as any JSON
                properties[name] = {}
            if parameter.default is inspect.Parameter.empty:
                required.append(name)
        return {"type": "object", "properties": properties, "required": required}

    # -- enqueueing ---------------------------------------------------------------------

    def job(self, *args: P.args, **kwargs: P.kwargs) -> NewJob:
        """A checked, not yet stored job: for ``app.enqueue_many``."""
        return self.app.new_job(self, args, kwargs, NO_OPTIONS)

    def step(self, *args: Any, **kwargs: Any) -> Step:
        """A workflow step: this task with its own arguments, for ``chain``, ``group`` and ``chord``.

        After another step it receives that step's result as its first argument, so give only
        the rest here (``.immutable()`` opts out). Arguments are checked when the workflow is enqueued.
        """
        return Step(self, args, dict(kwargs))

    async def enqueue(self, *args: P.args, **kwargs: P.kwargs) -> Job:
        """Store a job for this task; a worker runs it. Returns the stored job."""
        return await self.app.enqueue_new(self.app.new_job(self, args, kwargs, NO_OPTIONS))

    def using(self, **options: Any) -> BoundTask[P, R]:
        """This task with enqueue options set: ``await task.using(delay=60).enqueue(x)``.

        Options: queue, priority, delay (seconds or timedelta), run_at, max_attempts,
        timeout, idempotency_key, correlation_id, connection (enqueue inside your transaction).
        """
        connection = options.pop("connection", None)
        try:
            enqueue_options = EnqueueOptions(**options)
        except TypeError as exc:
            raise TypeError(f"{exc}; see Task.using for the options") from None
        return BoundTask(self, enqueue_options, connection)


class BoundTask(Generic[P, R]):
    """A task plus enqueue options; made by ``Task.using``."""

    def __init__(self, task: Task[P, R], options: EnqueueOptions, connection: Any) -> None:
        self.task = task
        self.options = options
        self.connection = connection

    def using(self, **options: Any) -> BoundTask[P, R]:
        connection = options.pop("connection", self.connection)
        return BoundTask(self.task, replace(self.options, **options), connection)

    def job(self, *args: P.args, **kwargs: P.kwargs) -> NewJob:
        return self.task.app.new_job(self.task, args, kwargs, self.options)

    def step(self, *args: Any, **kwargs: Any) -> Step:
        """A workflow step with these options (see ``Task.step``)."""
        return Step(self.task, args, dict(kwargs), self.options)

    async def enqueue(self, *args: P.args, **kwargs: P.kwargs) -> Job:
        new = self.task.app.new_job(self.task, args, kwargs, self.options)
        return await self.task.app.enqueue_new(new, connection=self.connection)


def is_retryable(task: Task[..., Any] | None, error: BaseException) -> bool:
    """Whether a failed attempt may be tried again."""
    if isinstance(error, (PermanentError, TaskArgumentsError)):
        return False
    retry_on = task.options.retry_on if task else (Exception,)
    return isinstance(error, retry_on)
