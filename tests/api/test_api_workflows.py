"""The workflow routes: submit a JSON tree, long-poll it to the end, and every way to get it wrong."""

from __future__ import annotations

from typing import Any

from tests.api.support import Api, Controls, assert_envelope

from conveyor.api.schemas import WorkflowPublic


def step(task: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
    return {"task": task, "args": list(args), "kwargs": kwargs}


async def test_a_submitted_chain_answers_202_and_a_long_poll_returns_its_result(api: Api) -> None:
    response = await api.client.post(
        "/workflows",
        json={"name": "sums", "workflow": {"chain": [step("add", 1, 2), step("add", 10), step("add", b=100)]}},
        headers={"X-Correlation-ID": "flow-1"},
    )

    assert response.status_code == 202, response.text
    submitted = WorkflowPublic.model_validate(response.json())
    assert (submitted.name, submitted.state, submitted.counts) == ("sums", "running", {"queued": 1, "waiting": 2})
    assert [job.workflow_id for job in submitted.jobs] == [submitted.id] * 3
    assert response.headers["location"] == f"http://test/workflows/{submitted.id}"

    finished = await api.client.get(f"/workflows/{submitted.id}", params={"wait": 10})

    done = WorkflowPublic.model_validate(finished.json())
    assert (done.state, done.result) == ("succeeded", 113)
    assert [job.result for job in done.jobs] == [3, 13, 113]
    assert {job.correlation_id for job in done.jobs} == {"flow-1"}
    assert done.structure == {"chain": [{"job": job.id, "task": "add"} for job in done.jobs]}


async def test_a_chord_in_json_runs_its_callback_with_every_member_result(api: Api) -> None:
    members = [step("add", number, number) for number in range(20)]
    body = {"workflow": {"chord": {"group": members, "callback": step("total")}}}

    submitted = (await api.client.post("/workflows", json=body)).json()
    done = WorkflowPublic.model_validate((await api.client.get(f"/workflows/{submitted['id']}?wait=10")).json())

    assert (done.state, done.result) == ("succeeded", sum(2 * number for number in range(20)))
    assert done.jobs[-1].args == [[2 * number for number in range(20)]]


async def test_immutable_steps_and_groups_nest_in_json(api: Api) -> None:
    body = {
        "workflow": {
            "chain": [
                step("add", 1, 1),
                {"group": [step("add", 1), {"chain": [step("add", 2), step("add", 3)]}]},
                {**step("add", 5, 5), "immutable": True},
            ]
        }
    }

    submitted = (await api.client.post("/workflows", json=body)).json()
    done = WorkflowPublic.model_validate((await api.client.get(f"/workflows/{submitted['id']}?wait=10")).json())

    assert done.state == "succeeded"
    assert [job.result for job in done.jobs] == [2, 3, 4, 7, 10]


async def test_a_failed_step_fails_the_workflow_and_its_dependents_are_cancelled(api: Api, controls: Controls) -> None:
    body = {"workflow": {"chain": [step("flaky"), step("shout")]}}

    submitted = (await api.client.post("/workflows", json=body)).json()
    failed = WorkflowPublic.model_validate((await api.client.get(f"/workflows/{submitted['id']}?wait=10")).json())

    assert failed.state == "failed"
    assert [job.state for job in failed.jobs] == ["dead", "cancelled"]
    assert failed.jobs[1].error is not None
    assert failed.jobs[1].error.type == "DependencyFailed"

    controls.flaky_fails = False
    replay = await api.client.post(f"/jobs/{failed.jobs[0].id}/retry")
    assert replay.status_code == 200, replay.text
    done = WorkflowPublic.model_validate((await api.client.get(f"/workflows/{submitted['id']}?wait=10")).json())
    assert (done.state, done.result) == ("succeeded", "RECOVERED")


async def test_every_bad_step_is_reported_at_once_and_nothing_is_stored(idle_api: Api) -> None:
    body = {"workflow": {"chain": [step("add", 1, "two"), {"group": [step("nope"), step("add")]}, step("total", 1)]}}

    response = await idle_api.client.post("/workflows", json=body)

    error = assert_envelope(response, 422, "invalid_job")
    assert error["details"] == ["chain[1].group[0]: unknown task 'nope'"]
    fixed = {"workflow": {"chain": [step("add", 1, "two"), {"group": [step("add")]}, step("total", 1)]}}
    response = await idle_api.client.post("/workflows", json=fixed)
    error = assert_envelope(response, 422, "invalid_job")
    assert {problem.split(":")[0] for problem in error["details"]} == {
        "chain[0] (add)",
        "chain[1].group[0] (add)",
        "chain[2] (total)",
    }, error["details"]
    assert (await idle_api.client.get("/jobs")).json()["jobs"] == []


async def test_a_node_that_is_none_of_the_kinds_is_a_validation_error(idle_api: Api) -> None:
    response = await idle_api.client.post("/workflows", json={"workflow": {"chain": [{"steps": []}]}})

    error = assert_envelope(response, 422, "validation_error")
    assert any("one of: task, chain, group, chord" in item["message"] for item in error["details"])


async def test_an_unknown_workflow_is_404_in_the_envelope(idle_api: Api) -> None:
    response = await idle_api.client.get("/workflows/0190aaaa-0000-7000-8000-000000000000")

    error = assert_envelope(response, 404, "workflow_not_found")
    assert error["details"] == {"workflow_id": "0190aaaa-0000-7000-8000-000000000000"}


async def test_a_workflow_over_the_step_limit_is_refused(make_conveyor: Any) -> None:
    from tests.api.support import serve  # noqa: PLC0415 - this test builds its own app

    conveyor = make_conveyor(workflow_limit=3)
    async with serve(conveyor, run_worker=False) as api:
        body = {"workflow": {"group": [step("add", n, n) for n in range(4)]}}
        response = await api.client.post("/workflows", json=body)

    error = assert_envelope(response, 422, "invalid_job")
    assert error["details"] == ["the workflow has 4 steps; this server takes at most 3"]


def test_a_workflow_body_validates_from_models_as_well_as_from_json() -> None:
    from conveyor.api.schemas import ChainSpec, StepSpec, WorkflowCreate  # noqa: PLC0415 - this test only

    built = WorkflowCreate(workflow=ChainSpec(chain=[StepSpec(task="add", args=[1, 2]), StepSpec(task="total")]))
    parsed = WorkflowCreate.model_validate({"workflow": {"chain": [step("add", 1, 2), step("total")]}})

    assert built == parsed
