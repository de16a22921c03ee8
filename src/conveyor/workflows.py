"""Workflows: jobs that wait for other jobs. ``chain``, ``group`` and ``chord``, nested to any depth.

A workflow is stored whole when it is enqueued: every step is a job from the start, and a step
that depends on others waits in the ``waiting`` state with a count of the jobs it still needs.
The ack that completes a job moves its dependents on in the same transaction: it lowers their
counts, and queues the ones that reach zero. So a crash can't leave a workflow half-advanced,
and a chord over n members costs O(n) in all: each member's ack touches one counter.

How results travel: a step that follows another receives the result of what it follows as its
first positional argument, before its own arguments. What it follows is a step (its result), a
group (the list of its members' results, in order) or a chain (the result of its last part).
``step.immutable()`` turns that off for one step: it runs with its own arguments only.

A dependency that ends ``dead`` (or is cancelled) cancels every step that waits on it, directly
or through others, with a ``DependencyFailed`` error naming it; steps that don't depend on it
run on. Replaying the dead job (``conveyor dlq replay``) puts those steps back to waiting, and
the workflow goes on from there.
"""

from __future__ import annotations

import collections
import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

from conveyor.errors import TaskArgumentsError
from conveyor.jobs import Job, JobState, NewJob, new_job_id

if TYPE_CHECKING:
    from conveyor.tasks import EnqueueOptions, Task

DEPENDENCY_FAILED = "DependencyFailed"
"""The error type of a step cancelled because a job it waits for ended dead or cancelled."""

Template = str | list["Template"]
"""Where a step's input comes from: a job id (that job's result) or a list of templates."""


@dataclass(frozen=True, slots=True)
class Step:
    """One job of a workflow: a task, its own arguments and options. Made by ``task.step(...)``."""

    task: Task[..., Any]
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    options: EnqueueOptions | None = None
    receives_input: bool = True

    def immutable(self) -> Step:
        """This step without the result of what it follows: it runs with its own arguments only."""
        return replace(self, receives_input=False)

    async def enqueue(self, *, name: str | None = None, connection: Any = None) -> Workflow:
        return await self.task.app.enqueue_workflow(self, name=name, connection=connection)


@dataclass(frozen=True, slots=True)
class Chain:
    """Parts run one after another; each receives the result of the one before."""

    parts: tuple[Node, ...]

    async def enqueue(self, *, name: str | None = None, connection: Any = None) -> Workflow:
        return await _app_of(self).enqueue_workflow(self, name=name, connection=connection)


@dataclass(frozen=True, slots=True)
class Group:
    """Members run side by side; the group's result is the list of their results, in order."""

    members: tuple[Node, ...]

    async def enqueue(self, *, name: str | None = None, connection: Any = None) -> Workflow:
        return await _app_of(self).enqueue_workflow(self, name=name, connection=connection)


@dataclass(frozen=True, slots=True)
class Chord:
    """A group, then a callback that runs once, after every member succeeded, with their results."""

    header: Group
    callback: Node

    async def enqueue(self, *, name: str | None = None, connection: Any = None) -> Workflow:
        return await _app_of(self).enqueue_workflow(self, name=name, connection=connection)


Node = Step | Chain | Group | Chord


def chain(*parts: Node) -> Chain:
    """``chain(a, b, c)``: ``b`` starts once ``a`` succeeded, with ``a``'s result as its first argument."""
    if not parts:
        raise TypeError("chain() needs at least one part")
    return Chain(tuple(parts))


def group(*members: Node | Iterable[Node]) -> Group:
    """``group(a, b, c)`` or ``group(task.step(x) for x in xs)``: run side by side; results in order."""
    flat: list[Node] = []
    for member in members:
        if isinstance(member, (Step, Chain, Group, Chord)):
            flat.append(member)
        else:
            flat.extend(member)
    return Group(tuple(flat))


def chord(header: Group | Iterable[Node], callback: Node) -> Chord:
    """``chord(group(...), callback)``: the callback runs exactly once, with the list of results."""
    return Chord(header if isinstance(header, Group) else group(header), callback)


def _app_of(node: Node) -> Any:
    if isinstance(node, Step):
        return node.task.app
    if isinstance(node, Chain):
        return _app_of(node.parts[0])
    if isinstance(node, Chord):
        return _app_of(node.callback)
    for member in node.members:
        return _app_of(member)
    raise TypeError("an empty group has no task to find the application by; use app.enqueue_workflow")


class WorkflowState(enum.StrEnum):
    RUNNING = "running"
    """Some step has yet to finish, and none has failed."""
    SUCCEEDED = "succeeded"
    """Every step succeeded; ``result`` holds the workflow's result."""
    FAILED = "failed"
    """A step ended dead (its dependents are cancelled); replaying it resumes the workflow."""
    CANCELLED = "cancelled"
    """A step was cancelled by a user; nothing else failed."""


@dataclass(frozen=True, slots=True)
class Workflow:
    """A stored workflow with its jobs, as read back."""

    id: str
    name: str | None
    structure: dict[str, Any]
    """The tree as enqueued: ``{"chain": [...]}``, ``{"group": [...]}``,
    ``{"chord": {"group": [...], "callback": ...}}`` and ``{"job": id, "task": name}`` at the leaves."""
    output: Template
    created_at: datetime
    correlation_id: str | None
    jobs: tuple[Job, ...]
    """Every step's job, in the order of the tree."""

    @property
    def state(self) -> WorkflowState:
        if any(job.state is JobState.DEAD for job in self.jobs):
            return WorkflowState.FAILED
        if any(
            job.state is JobState.CANCELLED and (job.error is None or job.error.type != DEPENDENCY_FAILED)
            for job in self.jobs
        ):
            return WorkflowState.CANCELLED
        if all(job.state is JobState.SUCCEEDED for job in self.jobs):
            return WorkflowState.SUCCEEDED
        return WorkflowState.RUNNING

    @property
    def counts(self) -> dict[str, int]:
        """Steps by state."""
        return dict(collections.Counter(job.state.value for job in self.jobs))

    @property
    def finished(self) -> bool:
        """Every job has finished: nothing more runs unless someone replays or retries a job."""
        return all(job.finished for job in self.jobs)

    @property
    def result(self) -> Any:
        """The workflow's result once it succeeded (None before): shaped like its output template."""
        if self.state is not WorkflowState.SUCCEEDED:
            return None
        return resolve(self.output, {job.id: job.result for job in self.jobs})

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "state": self.state.value,
            "created_at": self.created_at.isoformat(),
            "correlation_id": self.correlation_id,
            "result": self.result,
            "counts": self.counts,
            "structure": self.structure,
            "jobs": [job.to_json() for job in self.jobs],
        }


def resolve(template: Template, results: dict[str, Any]) -> Any:
    """Build a step's input from the results of the jobs the template names."""
    if isinstance(template, str):
        # Pruning keeps the steps of unfinished workflows, so a result is only missing if
        # someone deleted rows by hand; the step then gets null rather than failing the ack.
        return results.get(template)
    return [resolve(part, results) for part in template]


def template_job_ids(template: Template) -> list[str]:
    if isinstance(template, str):
        return [template]
    return [job_id for part in template for job_id in template_job_ids(part)]


@dataclass(slots=True)
class CompiledWorkflow:
    """A workflow turned into rows: its jobs (dependents waiting), the edges, and its record."""

    id: str
    jobs: list[NewJob]
    edges: list[tuple[str, str]]
    """(dependency id, dependent id)."""
    structure: dict[str, Any]
    output: Template


@dataclass(frozen=True, slots=True)
class _Upstream:
    """What a node follows: the jobs it must wait for, and how their results form its input."""

    job_ids: tuple[str, ...]
    template: Template


class _Compiler:
    def __init__(self, workflow_id: str, correlation_id: str | None, new_job: Any) -> None:
        self.workflow_id = workflow_id
        self.correlation_id = correlation_id
        self._new_job = new_job
        self.jobs: list[NewJob] = []
        self.edges: list[tuple[str, str]] = []
        self.problems: list[str] = []

    def place(self, node: Node, upstream: _Upstream | None, path: str) -> tuple[_Upstream | None, dict[str, Any]]:
        """Add the node's jobs; return what follows it would wait for, and its structure."""
        if isinstance(node, Step):
            return self._place_step(node, upstream, path)
        if isinstance(node, Chain):
            parts = []
            for index, part in enumerate(node.parts):
                upstream, structure = self.place(part, upstream, f"{path}.chain[{index}]")
                parts.append(structure)
            return upstream, {"chain": parts}
        header = node.header if isinstance(node, Chord) else node
        ids: list[str] = []
        templates: list[Template] = []
        members = []
        where = f"{path}.chord.group" if isinstance(node, Chord) else f"{path}.group"
        for index, member in enumerate(header.members):
            after, structure = self.place(member, upstream, f"{where}[{index}]")
            members.append(structure)
            if after is not None:
                ids.extend(after.job_ids)
                templates.append(after.template)
        # An empty group passes its own upstream on (there is nothing else to wait for).
        waited = tuple(dict.fromkeys(ids)) if header.members else (upstream.job_ids if upstream else ())
        after_group = _Upstream(waited, templates)
        if isinstance(node, Group):
            return after_group, {"group": members}
        after_callback, callback = self.place(node.callback, after_group, f"{path}.chord.callback")
        return after_callback, {"chord": {"group": members, "callback": callback}}

    def _place_step(self, step: Step, upstream: _Upstream | None, path: str) -> tuple[_Upstream | None, dict[str, Any]]:
        takes_input = upstream is not None and step.receives_input
        try:
            new = self._new_job(step, takes_input=takes_input)
        except TaskArgumentsError as exc:
            self.problems.extend(f"{path.removeprefix('.') or 'step'} ({step.task.name}): {p}" for p in exc.problems)
            # Later steps are still checked, as if they waited for this one; nothing is stored.
            return _Upstream(("unchecked",), "unchecked"), {"job": None, "task": step.task.name}
        waits_for = upstream.job_ids if upstream is not None else ()
        template = upstream.template if takes_input and upstream is not None else None
        args = new.args
        if template is not None and not waits_for:
            # Nothing to wait for (it follows an empty group): its input is known now.
            args, template = [resolve(template, {}), *args], None
        new = replace(
            new,
            args=args,
            workflow_id=self.workflow_id,
            correlation_id=new.correlation_id or self.correlation_id,
            waiting_on=len(waits_for),
            input_template=template,
        )
        self.jobs.append(new)
        self.edges.extend((dependency, new.id) for dependency in waits_for)
        return _Upstream((new.id,), new.id), {"job": new.id, "task": step.task.name}


def compile_workflow(node: Node, *, new_job: Any, correlation_id: str | None) -> CompiledWorkflow:
    """Turn a workflow into rows, checking every step; raise once with every problem found.

    ``new_job(step, takes_input=...)`` checks one step and returns its ``NewJob``.
    """
    compiler = _Compiler(new_job_id(), correlation_id, new_job)
    after, structure = compiler.place(node, None, "")
    if compiler.problems:
        raise TaskArgumentsError("cannot enqueue the workflow", compiler.problems)
    if not compiler.jobs:
        raise TaskArgumentsError("cannot enqueue the workflow", ["it has no steps"])
    return CompiledWorkflow(
        id=compiler.workflow_id,
        jobs=compiler.jobs,
        edges=compiler.edges,
        structure=structure,
        output=after.template if after is not None else [],
    )


def order_jobs(structure: dict[str, Any], jobs: Sequence[Job]) -> tuple[Job, ...]:
    """The jobs in the order their steps appear in the tree."""
    by_id = {job.id: job for job in jobs}
    ordered: list[Job] = []

    def walk(node: dict[str, Any]) -> None:
        if "job" in node:
            if node["job"] in by_id:
                ordered.append(by_id[node["job"]])
        elif "chain" in node:
            for part in node["chain"]:
                walk(part)
        elif "group" in node:
            for member in node["group"]:
                walk(member)
        else:
            for member in node["chord"]["group"]:
                walk(member)
            walk(node["chord"]["callback"])

    walk(structure)
    return tuple(ordered)
