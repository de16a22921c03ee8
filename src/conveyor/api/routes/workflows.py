"""Workflows: submit a chain, group or chord as one JSON tree; read every step's state."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response, status

from conveyor.api.deps import CanRead, CanWrite, ConveyorDep, WatcherDep
from conveyor.api.errors import ERROR_RESPONSES
from conveyor.api.schemas import (
    ChainSpec,
    ChordSpec,
    ErrorEnvelope,
    GroupSpec,
    NodeSpec,
    StepSpec,
    WorkflowCreate,
    WorkflowPublic,
)
from conveyor.app import Conveyor
from conveyor.errors import TaskArgumentsError
from conveyor.tasks import EnqueueOptions
from conveyor.workflows import Chain, Group, Node, Step, chord, group

router = APIRouter(prefix="/workflows", tags=["workflows"], responses=ERROR_RESPONSES)

_NOT_FOUND: dict[int | str, dict[str, object]] = {404: {"model": ErrorEnvelope, "description": "No such workflow"}}


class _Builder:
    """Turns the JSON tree into workflow nodes, collecting every unknown task on the way."""

    def __init__(self, conveyor: Conveyor) -> None:
        self.conveyor = conveyor
        self.problems: list[str] = []
        self.steps = 0

    def build(self, spec: NodeSpec, path: str) -> Node | None:
        if isinstance(spec, StepSpec):
            self.steps += 1
            if spec.task not in self.conveyor.tasks:
                self.problems.append(f"{path.removeprefix('.') or 'step'}: unknown task {spec.task!r}")
                return None
            options = EnqueueOptions(
                queue=spec.queue,
                priority=spec.priority,
                max_attempts=spec.max_attempts,
                timeout=spec.timeout_seconds,
            )
            step = Step(self.conveyor.tasks[spec.task], tuple(spec.args), dict(spec.kwargs), options)
            return step.immutable() if spec.immutable else step
        if isinstance(spec, ChainSpec):
            parts = [self.build(part, f"{path}.chain[{index}]") for index, part in enumerate(spec.chain)]
            return Chain(tuple(part for part in parts if part is not None))
        if isinstance(spec, GroupSpec):
            members = [self.build(member, f"{path}.group[{index}]") for index, member in enumerate(spec.group)]
            return Group(tuple(member for member in members if member is not None))
        assert isinstance(spec, ChordSpec)
        members = [self.build(member, f"{path}.chord.group[{index}]") for index, member in enumerate(spec.chord.group)]
        callback = self.build(spec.chord.callback, f"{path}.chord.callback")
        if callback is None:
            return None
        return chord(group(member for member in members if member is not None), callback)


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=WorkflowPublic,
    summary="Submit a workflow",
)
async def create_workflow(
    body: WorkflowCreate, request: Request, response: Response, conveyor: ConveyorDep, _principal: CanWrite
) -> WorkflowPublic:
    """Store every step at once and answer with the workflow's id; poll `GET /workflows/{id}`.

    A step that follows another receives its result as the first positional argument (a group's
    result is the list of its members' results). Every problem in every step is reported at once.
    """
    builder = _Builder(conveyor)
    node = builder.build(body.workflow, "")
    limit = conveyor.settings.workflow_limit
    if builder.steps > limit:
        builder.problems.append(f"the workflow has {builder.steps} steps; this server takes at most {limit}")
    if builder.problems or node is None:
        raise TaskArgumentsError("cannot enqueue the workflow", builder.problems or ["it has no steps"])
    # The request's correlation id is current here, so every step carries it.
    workflow = await conveyor.enqueue_workflow(node, name=body.name)
    response.headers["Location"] = str(request.url_for("get_workflow", workflow_id=workflow.id))
    return WorkflowPublic.of(workflow)


@router.get("/{workflow_id}", response_model=WorkflowPublic, responses=_NOT_FOUND, summary="Get a workflow")
async def get_workflow(
    workflow_id: str,
    conveyor: ConveyorDep,
    watcher: WatcherDep,
    _principal: CanRead,
    wait: Annotated[
        float, Query(ge=0, le=60, description="Hold the request up to this many seconds until the workflow finishes.")
    ] = 0,
) -> WorkflowPublic:
    workflow = await conveyor.get_workflow(workflow_id)
    if wait > 0 and not workflow.finished:
        # The workflow has finished when every step has; the watcher learns of each in batches.
        await asyncio.gather(*(watcher.wait(job.id, wait) for job in workflow.jobs if not job.finished))
        workflow = await conveyor.get_workflow(workflow_id)
    return WorkflowPublic.of(workflow)
