"""The job routes' happy paths and their conflicts: submit, look up, long-poll, list, batch,
cancel, retry, attempts."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import httpx
from tests.api.support import Api, Controls, FakeClock, assert_envelope, serve
from tests.support.waiting import eventually

from conveyor import Conveyor
from conveyor.api.schemas import AttemptsPublic, BatchResult, JobPublic, JobsPublic

FIXED = datetime(2026, 1, 1, tzinfo=UTC)
ADD = {"task": "add", "kwargs": {"a": 1, "b": 1}}


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


async def test_submitting_a_job_answers_202_with_the_job_and_its_location(idle_api: Api) -> None:
    response = await idle_api.client.post("/jobs", json={"task": "add", "kwargs": {"a": 2, "b": 3}, "priority": 7})

    assert response.status_code == 202
    job = JobPublic.model_validate(response.json())
    assert (job.task, job.queue, job.priority, job.state, job.attempt) == ("add", "default", 7, "queued", 0)
    assert job.max_attempts == 5, "the app's default, as the task sets none"
    assert job.result is None
    assert job.finished_at is None
    assert response.headers["location"] == f"http://test/jobs/{job.id}"
    followed = await idle_api.client.get(response.headers["location"])
    assert followed.status_code == 200
    assert followed.json()["id"] == job.id


async def test_the_location_follows_the_host_and_root_path_of_each_request(idle_api: Api) -> None:
    # As request.url_for makes it; the route keeps the last base it made, so the cases alternate.
    for root_path, host in (("", "test"), ("/api", "test"), ("/api", "other.example:8080"), ("", "test")):
        transport = httpx.ASGITransport(app=idle_api.app, root_path=root_path)
        async with httpx.AsyncClient(transport=transport, base_url=f"http://{host}") as client:
            response = await client.post("/jobs", json=ADD)
        assert response.status_code == 202
        assert response.headers["location"] == f"http://{host}{root_path}/jobs/{response.json()['id']}"


async def test_a_submission_in_a_callers_trace_stores_that_trace_with_the_job(idle_api: Api) -> None:
    # With or without a tracer provider installed: the job's attempts are to continue the caller's trace.
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    traceparent = f"00-{trace_id}-00f067aa0ba902b7-01"
    response = await idle_api.client.post("/jobs", json=ADD, headers={"traceparent": traceparent})

    job = await idle_api.conveyor.get_job(response.json()["id"])
    assert job.trace_context is not None
    assert job.trace_context["traceparent"].split("-")[1] == trace_id


async def test_submissions_that_arrive_together_are_stored_in_shared_transactions(idle_api: Api) -> None:
    responses = await asyncio.gather(*(idle_api.client.post("/jobs", json=ADD) for _ in range(20)))

    assert [response.status_code for response in responses] == [202] * 20
    assert len({response.json()["id"] for response in responses}) == 20
    # A transaction stores all its jobs at one time: fewer times than jobs means shared ones.
    created = {response.json()["created_at"] for response in responses}
    assert len(created) < 20, "each submission had its own transaction"
    assert len(await idle_api.job_ids()) == 20


async def test_getting_a_job_returns_it_as_stored(idle_api: Api) -> None:
    submitted = await idle_api.submit("shout", kwargs={"text": "hi"}, max_attempts=2, timeout_seconds=9.5)

    response = await idle_api.client.get(f"/jobs/{submitted['id']}")

    assert response.status_code == 200
    assert response.json() == submitted
    assert (submitted["queue"], submitted["max_attempts"], submitted["timeout_seconds"]) == ("emails", 2, 9.5)


async def test_a_long_poll_returns_as_soon_as_the_job_finishes_with_its_result(api: Api, controls: Controls) -> None:
    job = await api.submit("blocked")
    await asyncio.wait_for(controls.started.wait(), 5)
    poll = asyncio.create_task(api.client.get(f"/jobs/{job['id']}", params={"wait": 5}))

    async def poll_is_waiting() -> bool:
        return job["id"] in api.app.state.watcher._waiters

    await eventually(poll_is_waiting, timeout=5)
    assert not poll.done(), "the job is still running, so the long poll must still be waiting"
    loop = asyncio.get_running_loop()
    released_at = loop.time()
    controls.release.set()
    response = await poll

    assert response.status_code == 200
    assert loop.time() - released_at < 4, "woken by the job finishing, not by the 5 s wait running out"
    finished = JobPublic.model_validate(response.json())
    assert (finished.state, finished.result, finished.attempt) == ("succeeded", "done", 1)
    assert finished.finished_at is not None


async def test_a_long_poll_on_a_job_that_cannot_finish_returns_it_unfinished_after_the_wait(idle_api: Api) -> None:
    job = await idle_api.submit("add", kwargs={"a": 1, "b": 1})
    loop = asyncio.get_running_loop()
    began = loop.time()

    response = await idle_api.client.get(f"/jobs/{job['id']}", params={"wait": 0.3})

    elapsed = loop.time() - began
    assert response.status_code == 200
    assert response.json()["state"] == "queued"
    assert 0.25 <= elapsed < 2, f"held for about the wait, not {elapsed:.2f}s"


async def test_listing_jobs_filters_by_state_queue_task_and_creation_time(idle_api: Api) -> None:
    clock = FakeClock(FIXED)
    idle_api.conveyor.clock = clock
    first = (await idle_api.submit("add", kwargs={"a": 1, "b": 1}))["id"]
    clock.now = FIXED + timedelta(minutes=1)
    emailed = (await idle_api.submit("add", kwargs={"a": 1, "b": 2}, queue="emails"))["id"]
    clock.now = FIXED + timedelta(minutes=2)
    scheduled = (await idle_api.submit("shout", kwargs={"text": "later"}, delay_seconds=3600))["id"]
    clock.now = FIXED + timedelta(minutes=3)
    cancelled = (await idle_api.submit("add", kwargs={"a": 1, "b": 3}))["id"]
    assert (await idle_api.client.post(f"/jobs/{cancelled}/cancel")).status_code == 200

    assert await idle_api.job_ids() == [cancelled, scheduled, emailed, first], "newest first"
    assert await idle_api.job_ids(state="queued") == [emailed, first]
    assert await idle_api.job_ids(state=["queued", "cancelled"]) == [cancelled, emailed, first]
    assert await idle_api.job_ids(queue="emails") == [scheduled, emailed]
    assert await idle_api.job_ids(task="shout") == [scheduled]
    assert await idle_api.job_ids(queue="emails", state="scheduled") == [scheduled]
    window = {"created_after": _iso(FIXED + timedelta(minutes=1)), "created_before": _iso(FIXED + timedelta(minutes=3))}
    assert await idle_api.job_ids(**window) == [scheduled, emailed], "after is inclusive, before exclusive"

    naive = await idle_api.client.get("/jobs", params={"created_after": "2026-01-01T00:00:00"})
    assert_envelope(naive, 422, "validation_error")


async def test_listing_pages_through_every_job_once_with_the_cursor(idle_api: Api) -> None:
    submitted = [(await idle_api.submit("add", kwargs={"a": n, "b": n}))["id"] for n in range(5)]

    pages: list[JobsPublic] = []
    cursor: str | None = None
    while True:
        params: dict[str, str | int] = {"limit": 2} if cursor is None else {"limit": 2, "cursor": cursor}
        response = await idle_api.client.get("/jobs", params=params)
        assert response.status_code == 200
        pages.append(JobsPublic.model_validate(response.json()))
        cursor = pages[-1].next_cursor
        if cursor is None:
            break

    assert [len(page.jobs) for page in pages] == [2, 2, 1]
    assert [job.id for page in pages for job in page.jobs] == submitted[::-1]


async def test_a_batch_reports_each_item_in_order_and_bad_items_do_not_sink_the_others(api: Api) -> None:
    items = [
        {"task": "add", "kwargs": {"a": 1, "b": 2}},
        {"task": "no_such_task"},
        {"task": "add", "kwargs": {"a": "one", "b": "two"}},
        {"task": "add", "kwargs": {"a": 3, "b": 4}},
    ]

    response = await api.client.post("/jobs/batch", json={"jobs": items})

    assert response.status_code == 200
    results = BatchResult.model_validate(response.json()).results
    assert [(result.index, result.status) for result in results] == [
        (0, "created"),
        (1, "error"),
        (2, "error"),
        (3, "created"),
    ]
    unknown, invalid = results[1].error, results[2].error
    assert unknown is not None
    assert (unknown.code, unknown.details) == ("unknown_task", {"task": "no_such_task"})
    assert invalid is not None
    assert invalid.code == "invalid_job"
    assert [problem.split(":")[0] for problem in invalid.details] == ["a", "b"], "every problem, not the first"
    created = [result.job for result in results if result.job is not None]
    assert [(await api.wait(job.id))["result"] for job in created] == [3, 7]
    assert sorted(await api.job_ids()) == sorted(job.id for job in created)


async def test_a_batch_over_the_limit_is_refused_whole_with_413(make_conveyor: Callable[..., Conveyor]) -> None:
    job = {"task": "add", "kwargs": {"a": 1, "b": 1}}
    async with serve(make_conveyor(batch_limit=2), run_worker=False) as served:
        too_many = await served.client.post("/jobs/batch", json={"jobs": [job] * 3})

        error = assert_envelope(too_many, 413, "batch_too_large")
        assert "2" in error["message"]
        assert await served.job_ids() == [], "nothing of a refused batch is stored"
        at_limit = await served.client.post("/jobs/batch", json={"jobs": [job] * 2})
        assert at_limit.status_code == 200
        assert len(await served.job_ids()) == 2


async def test_cancelling_a_queued_job_cancels_it(idle_api: Api) -> None:
    job = await idle_api.submit("add", kwargs={"a": 1, "b": 1})

    response = await idle_api.client.post(f"/jobs/{job['id']}/cancel")

    assert response.status_code == 200
    assert response.json()["state"] == "cancelled"
    assert response.json()["finished_at"] is not None
    assert (await idle_api.client.get(f"/jobs/{job['id']}")).json()["state"] == "cancelled"


async def test_cancelling_a_finished_job_is_a_409_conflict(api: Api) -> None:
    job = await api.submit("add", kwargs={"a": 1, "b": 1})
    assert (await api.wait(job["id"]))["state"] == "succeeded"

    response = await api.client.post(f"/jobs/{job['id']}/cancel")

    error = assert_envelope(response, 409, "job_state_conflict")
    assert error["details"] == {"job_id": job["id"], "state": "succeeded"}
    assert (await api.client.get(f"/jobs/{job['id']}")).json()["state"] == "succeeded", "left as it was"


async def test_retrying_a_dead_job_queues_it_again_and_it_runs(api: Api, controls: Controls) -> None:
    job = await api.submit("flaky")
    dead = await api.wait(job["id"])
    assert dead["state"] == "dead"
    assert dead["error"] == {"type": "RuntimeError", "message": "flaky failed, as told"}
    controls.flaky_fails = False

    response = await api.client.post(f"/jobs/{job['id']}/retry")

    assert response.status_code == 200
    retried = response.json()
    assert (retried["state"], retried["attempt"], retried["finished_at"]) == ("queued", 0, None)
    done = await api.wait(job["id"])
    assert (done["state"], done["result"]) == ("succeeded", "recovered")


async def test_retrying_a_queued_job_is_a_409_conflict(idle_api: Api) -> None:
    job = await idle_api.submit("add", kwargs={"a": 1, "b": 1})

    response = await idle_api.client.post(f"/jobs/{job['id']}/retry")

    error = assert_envelope(response, 409, "job_state_conflict")
    assert error["details"] == {"job_id": job["id"], "state": "queued"}


async def test_attempts_list_every_attempt_with_its_outcome(api: Api, controls: Controls) -> None:
    job = await api.submit("flaky")
    await api.wait(job["id"])
    controls.flaky_fails = False
    assert (await api.client.post(f"/jobs/{job['id']}/retry")).status_code == 200
    await api.wait(job["id"])

    response = await api.client.get(f"/jobs/{job['id']}/attempts")

    assert response.status_code == 200
    history = AttemptsPublic.model_validate(response.json())
    assert history.job_id == job["id"]
    failed, succeeded = history.attempts
    assert failed.outcome == "failed"
    assert failed.error is not None
    assert (failed.error.type, failed.error.message) == ("RuntimeError", "flaky failed, as told")
    assert succeeded.outcome == "succeeded"
    assert succeeded.error is None
    for attempt in history.attempts:
        assert attempt.worker
        assert "#" not in attempt.worker, "the lease token is internal"
        assert attempt.started_at is not None
        assert attempt.ended_at is not None
        assert attempt.started_at <= attempt.ended_at


async def test_attempts_include_a_running_entry_while_the_job_runs(api: Api, controls: Controls) -> None:
    job = await api.submit("blocked")
    await asyncio.wait_for(controls.started.wait(), 5)

    running = (await api.client.get(f"/jobs/{job['id']}/attempts")).json()["attempts"]

    assert len(running) == 1
    assert running[0]["attempt"] == 1
    assert running[0]["outcome"] == "running"
    assert running[0]["ended_at"] is None
    assert running[0]["started_at"] is not None
    assert running[0]["worker"]
    controls.release.set()
    await api.wait(job["id"])
    finished = (await api.client.get(f"/jobs/{job['id']}/attempts")).json()["attempts"]
    assert [attempt["outcome"] for attempt in finished] == ["succeeded"]


async def test_cancelling_a_running_job_answers_202_and_the_job_ends_cancelled(
    make_conveyor: Callable[..., Conveyor],
) -> None:
    conveyor = make_conveyor(cancel_check_seconds=0.1)
    entered = asyncio.Event()

    @conveyor.task
    async def endless() -> None:
        entered.set()
        await asyncio.sleep(60)

    async with serve(conveyor) as api:
        job_id = (await api.client.post("/jobs", json={"task": "endless"})).json()["id"]
        await asyncio.wait_for(entered.wait(), 10)
        asked = await api.client.post(f"/jobs/{job_id}/cancel")
        final = (await api.client.get(f"/jobs/{job_id}", params={"wait": 10})).json()
    assert asked.status_code == 202
    assert asked.json()["state"] == "running"
    assert asked.json()["cancel_requested_at"] is not None
    assert final["state"] == "cancelled"


async def test_a_unique_key_over_http_returns_the_unfinished_job(make_conveyor: Callable[..., Conveyor]) -> None:
    conveyor = make_conveyor()
    async with serve(conveyor, run_worker=False) as api:
        first = await api.client.post("/jobs", json={"task": "add", "args": [1, 2], "unique_key": "sum:1:2"})
        again = await api.client.post("/jobs", json={"task": "add", "args": [1, 2], "unique_key": "sum:1:2"})
    assert first.json()["id"] == again.json()["id"]
    assert again.json()["unique_key"] == "sum:1:2"
