"""Property-based, with schemathesis: for every documented operation, generated requests (valid
and invalid) never get a 500, and every response keeps to the status codes, media types,
headers and schemas that the OpenAPI document promises.

schemathesis's lazy pytest loader (``schemathesis.pytest.from_fixture``) does not run on pytest 9
(it sets ``Node._nodeid``, which pytest 9 removed), so each operation runs its own Hypothesis
test over ``APIOperation.as_strategy`` against a fresh app.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import APIOperation, BaseSchema, Case, CheckFunction, Config, GenerationMode, openapi
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import negative_data_rejection, positive_data_acceptance
from tests.api.support import Controls, add_token, bearer, register_tasks

from conveyor import Conveyor
from conveyor.api.app import create_app
from conveyor.tokens import Scope

OPERATIONS = (
    "POST /jobs",
    "GET /jobs",
    "POST /jobs/batch",
    "GET /jobs/{job_id}",
    "POST /jobs/{job_id}/cancel",
    "POST /jobs/{job_id}/retry",
    "GET /jobs/{job_id}/attempts",
    "POST /workflows",
    "GET /workflows/{workflow_id}",
    "GET /queues",
    "GET /schedules",
    "GET /tasks",
    "GET /health",
    "GET /ready",
    "GET /metrics",
)
GOOD_JOBS: list[dict[str, Any]] = [
    {"task": "add", "kwargs": {"a": 1, "b": 2}},
    {"task": "shout", "args": ["hi"], "queue": "emails", "priority": 3},
    {"task": "flaky", "max_attempts": 1},
    {"task": "add", "kwargs": {"a": 1, "b": 2}, "delay_seconds": 3600},
]
GOOD_WORKFLOWS: list[dict[str, Any]] = [
    {"workflow": {"chain": [{"task": "add", "args": [1, 2]}, {"task": "add", "args": [3]}]}},
    {"workflow": {"chord": {"group": [{"task": "add", "args": [1, 1]}], "callback": {"task": "total"}}}},
    {"workflow": {"chain": [{"task": "flaky"}, {"task": "shout"}]}, "name": "fails"},
]
EXAMPLES_PER_OPERATION = 40
# Not part of this contract: the API checks more than JSON Schema can say (registered task
# names, task arguments, idempotency keys), so schema-valid requests may get a 422; and query
# parsing is lenient in FastAPI's usual ways (a repeated scalar parameter takes the last value,
# a bare number is read as a Unix timestamp), so some schema-invalid queries are answered.
NOT_CHECKED: list[CheckFunction] = [positive_data_acceptance, negative_data_rejection]


@dataclass(frozen=True)
class Contract:
    schema: BaseSchema
    token: str


async def _admin_token(conveyor: Conveyor) -> str:
    async with conveyor:
        return (await add_token(conveyor, Scope.ADMIN))[1]


@pytest.fixture
def contract(database_url: str) -> Contract:
    """The app's schema, with its lifespan running and a token required (as in production)."""
    conveyor = Conveyor(database_url=database_url, poll_interval_seconds=0.05, shutdown_grace_seconds=0.5)
    register_tasks(conveyor, Controls())
    conveyor.schedule("add", "* * * * * */10", kwargs={"a": 1, "b": 2})  # so GET /schedules has one to describe
    token = asyncio.run(_admin_token(conveyor))
    # schemathesis sends the token where the schema's HTTPBearer scheme says, and checks that
    # requests without it are refused.
    config = Config.from_dict({"auth": {"openapi": {"HTTPBearer": {"bearer": token}}}})
    # Loading the schema starts the app's lifespan (the embedded worker runs) in schemathesis's
    # event loop thread; schemathesis's pytest plugin ends it as the test ends.
    return Contract(openapi.from_asgi("/openapi.json", create_app(conveyor), config=config), token)


def _operation(schema: BaseSchema, label: str) -> APIOperation:
    operation = schema.find_operation_by_label(label)
    assert operation is not None, f"{label} is not in the OpenAPI document"
    return operation


def _submitted_ids(contract: Contract, label: str, bodies: list[dict[str, Any]]) -> list[str]:
    """Real jobs or workflows (done, dead, scheduled, ...) so the routes that read them answer more than 404."""
    submit = _operation(contract.schema, label)
    ids = []
    for body in bodies:
        response = submit.Case(body=body).call(headers=bearer(contract.token))
        assert response.status_code == 202, response.text
        ids.append(response.json()["id"])
    return ids


def _strategy(contract: Contract, operation: APIOperation) -> st.SearchStrategy[Case]:
    strategies = [operation.as_strategy(mode) for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)]
    if "job_id" in operation.path:
        # A long poll on a job that never finishes would hold each example for up to a minute.
        query = {"wait": 0.05} if operation.label == "GET /jobs/{job_id}" else None
        strategies += [
            operation.as_strategy(path_parameters={"job_id": job_id}, query=query)
            for job_id in _submitted_ids(contract, "POST /jobs", GOOD_JOBS)
        ]
    if "workflow_id" in operation.path:
        strategies += [
            operation.as_strategy(path_parameters={"workflow_id": workflow_id}, query={"wait": 0.05})
            for workflow_id in _submitted_ids(contract, "POST /workflows", GOOD_WORKFLOWS)
        ]
    if operation.label == "POST /workflows":
        strategies += [operation.as_strategy(body=body) for body in GOOD_WORKFLOWS]
    if operation.label == "POST /jobs":
        strategies += [operation.as_strategy(body=body) for body in GOOD_JOBS]
    if operation.label == "POST /jobs/batch":
        strategies.append(operation.as_strategy(body={"jobs": [*GOOD_JOBS, {"task": "nope"}]}))
    return st.one_of(strategies)


def test_the_contract_test_covers_every_documented_operation(contract: Contract) -> None:
    documented = set()
    for result in contract.schema.get_all_operations():
        assert isinstance(result, Ok), result
        documented.add(result.ok().label)

    assert documented == set(OPERATIONS)


@pytest.mark.parametrize("label", OPERATIONS)
def test_every_response_keeps_to_the_published_contract(contract: Contract, label: str) -> None:
    operation = _operation(contract.schema, label)

    @given(case=_strategy(contract, operation))
    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
    )
    def responses_keep_to_the_contract(case: Case) -> None:
        case.call_and_validate(excluded_checks=NOT_CHECKED)

    responses_keep_to_the_contract()
