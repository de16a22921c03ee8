"""Tasks: registration, and the enqueue-time checks that keep bad jobs out of the database.

Each test registers its own functions on the fresh ``app`` (its own SQLite file) from conftest.
Annotations name module-level types, because they are resolved from the module's globals.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import BaseModel
from tests.support import postgres

from conveyor import CONTEXT, Conveyor, JobContext, JobState, TaskArgumentsError, UnknownTaskError
from conveyor.jobs import Job, NewJob
from conveyor.storage import Store

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


class Item(BaseModel):
    name: str
    qty: int = 1


async def stored_count(app: Conveyor) -> int:
    return len((await app.list_jobs(limit=1_000)).jobs)


def frozen_clock(app: Conveyor, now: datetime = T0) -> None:
    app.clock = lambda: now


# -- registration ------------------------------------------------------------------------------


def test_async_and_plain_functions_are_told_apart(app: Conveyor) -> None:
    @app.task
    async def fetch(url: str) -> str:
        return url

    @app.task
    def resize(path: str) -> str:
        return path.upper()

    assert fetch.is_async
    assert not resize.is_async
    assert set(app.tasks) == {"fetch", "resize"}
    assert app.get_task("resize") is resize
    # Called directly, a task is the plain function.
    assert resize("a.png") == "A.PNG"


def test_a_task_can_be_registered_under_another_name(app: Conveyor) -> None:
    @app.task(name="emails.send", queue="emails", priority=3, max_attempts=4, timeout=timedelta(seconds=90))
    async def send(to: str) -> None: ...

    assert send.name == "emails.send"
    assert app.get_task("emails.send") is send
    assert (send.options.queue, send.options.priority, send.options.max_attempts) == ("emails", 3, 4)
    assert send.options.timeout == 90


def test_a_duplicate_task_name_is_refused(app: Conveyor) -> None:
    @app.task(name="notify")
    async def notify_by_email(to: str) -> None: ...

    with pytest.raises(TypeError, match="the name 'notify' is taken"):

        @app.task(name="notify")
        async def notify_by_sms(to: str) -> None: ...

    assert app.get_task("notify") is notify_by_email


def test_cpu_true_on_an_async_function_is_refused(app: Conveyor) -> None:
    async def crunch(n: int) -> int:
        return n

    with pytest.raises(TypeError, match=r"cpu=True runs the function in another process: it must be a plain def"):
        app.task(cpu=True)(crunch)

    assert "crunch" not in app.tasks


async def test_enqueue_by_an_unknown_name_lists_the_registered_tasks(app: Conveyor) -> None:
    @app.task
    async def beta() -> None: ...

    @app.task
    async def alpha() -> None: ...

    with pytest.raises(UnknownTaskError) as caught:
        await app.enqueue("gamma", [1])

    assert str(caught.value) == "unknown task 'gamma' (registered: alpha, beta)"
    assert await stored_count(app) == 0


# -- argument checks ------------------------------------------------------------------------------


async def test_wrong_types_for_two_parameters_are_both_listed(app: Conveyor) -> None:
    @app.task
    async def charge(amount: int, currency: str, note: str = "") -> None: ...

    with pytest.raises(TaskArgumentsError) as caught:
        await charge.enqueue("ten", 5)  # ty: ignore[invalid-argument-type]

    problems = caught.value.problems
    assert len(problems) == 2
    assert problems[0].startswith("amount: ")
    assert problems[1].startswith("currency: ")
    assert all(problem in str(caught.value) for problem in problems)
    assert await stored_count(app) == 0


async def test_a_missing_argument_is_reported(app: Conveyor) -> None:
    @app.task
    async def charge(amount: int, currency: str) -> None: ...

    with pytest.raises(TaskArgumentsError) as caught:
        await charge.enqueue(10)  # ty: ignore[missing-argument]

    assert caught.value.problems == ["missing required argument 'currency'"]
    assert await stored_count(app) == 0


async def test_an_unexpected_keyword_is_reported(app: Conveyor) -> None:
    @app.task
    async def charge(amount: int) -> None: ...

    with pytest.raises(TaskArgumentsError) as caught:
        await app.enqueue("charge", [10], {"colour": "red"})

    assert caught.value.problems == ["unexpected keyword argument 'colour'"]
    assert await stored_count(app) == 0


async def test_values_that_are_not_json_are_all_reported(app: Conveyor) -> None:
    @app.task
    async def archive(blob, tags, label: str) -> None: ...  # unannotated: any JSON value

    with pytest.raises(TaskArgumentsError) as caught:
        await archive.enqueue(object(), {object(), object()}, label="ok")

    assert caught.value.problems == [
        "blob: a object is not JSON-serialisable",
        "tags: a set is not JSON-serialisable",
    ]
    assert await stored_count(app) == 0


async def test_problems_inside_a_model_argument_are_all_listed(app: Conveyor) -> None:
    @app.task
    async def stock(item: Item) -> None: ...

    with pytest.raises(TaskArgumentsError) as caught:
        await stock.enqueue({"qty": "many"})  # ty: ignore[invalid-argument-type]

    assert [problem.split(":", 1)[0] for problem in caught.value.problems] == ["item['name']", "item['qty']"]
    assert await stored_count(app) == 0


async def test_a_batch_with_one_bad_job_stores_nothing(app: Conveyor) -> None:
    @app.task
    async def ping(n: int) -> None: ...

    good = ping.job(1)
    with pytest.raises(TaskArgumentsError):
        await app.enqueue_many([good, ping.job("two")])  # ty: ignore[invalid-argument-type]

    assert await stored_count(app) == 0
    assert len(await app.enqueue_many([good, ping.job(3)])) == 2


async def test_typed_arguments_are_stored_as_json_and_revived_as_their_types(app: Conveyor) -> None:
    @app.task
    async def ship(when: datetime, item: Item, *, express: bool = False) -> None: ...

    job = await ship.enqueue(T0, Item(name="lamp", qty=2), express=True)
    stored = await app.get_job(job.id)

    assert stored.args == ["2026-03-01T12:00:00Z", {"name": "lamp", "qty": 2}]
    assert stored.kwargs == {"express": True}
    args, kwargs = ship.from_json_arguments(stored.args, stored.kwargs)
    assert args == [T0, Item(name="lamp", qty=2)]
    assert isinstance(args[0], datetime)
    assert isinstance(args[1], Item)
    assert kwargs == {"express": True}


async def test_a_model_argument_may_be_given_as_a_dict_and_gets_its_defaults(app: Conveyor) -> None:
    @app.task
    async def stock(item: Item) -> None: ...

    job = await stock.enqueue({"name": "lamp"})  # ty: ignore[invalid-argument-type]

    assert (await app.get_job(job.id)).args == [{"name": "lamp", "qty": 1}]


async def test_a_job_context_parameter_is_not_an_argument(app: Conveyor) -> None:
    @app.task
    async def report(n: int, ctx: JobContext) -> int:
        return n

    @app.task
    async def summary(ctx: JobContext = CONTEXT, *, day: str) -> str:
        return day

    job = await report.enqueue(1)  # ty: ignore[missing-argument]
    other = await summary.enqueue(day="monday")

    assert (job.args, job.kwargs) == ([1], {})
    assert (other.args, other.kwargs) == ([], {"day": "monday"})
    assert report.context_parameter == "ctx"
    assert report.arguments_schema() == {
        "type": "object",
        "properties": {"n": {"type": "integer"}},
        "required": ["n"],
    }
    assert summary.arguments_schema() == {
        "type": "object",
        "properties": {"day": {"type": "string"}},
        "required": ["day"],
    }
    with pytest.raises(TaskArgumentsError, match="unexpected keyword argument 'ctx'"):
        await report.enqueue(1, ctx="not a context")  # ty: ignore[invalid-argument-type]


# -- enqueue options ------------------------------------------------------------------------------


async def test_a_delay_schedules_the_job_for_later(app: Conveyor) -> None:
    frozen_clock(app)

    @app.task
    async def ping(n: int) -> None: ...

    in_seconds = await ping.using(delay=90).enqueue(1)
    as_timedelta = await ping.using(delay=timedelta(minutes=2)).enqueue(2)
    at_time = await ping.using(run_at=T0 + timedelta(hours=1)).enqueue(3)
    now = await ping.enqueue(4)

    assert (in_seconds.state, in_seconds.created_at, in_seconds.run_at) == (
        JobState.SCHEDULED,
        T0,
        T0 + timedelta(seconds=90),
    )
    assert (as_timedelta.state, as_timedelta.run_at) == (JobState.SCHEDULED, T0 + timedelta(minutes=2))
    assert (at_time.state, at_time.run_at) == (JobState.SCHEDULED, T0 + timedelta(hours=1))
    assert (now.state, now.run_at) == (JobState.QUEUED, T0)


async def test_enqueue_options_override_the_task_defaults(app: Conveyor) -> None:
    @app.task(queue="bulk", priority=2, max_attempts=4, timeout=30)
    async def ping(n: int) -> None: ...

    plain = await ping.enqueue(1)
    tuned = await ping.using(priority=7, queue="urgent", max_attempts=9, timeout=3.5, correlation_id="req-1").enqueue(2)
    by_name = await app.enqueue("ping", [3], priority=-1, queue="late")

    assert (plain.queue, plain.priority, plain.max_attempts, plain.timeout_seconds) == ("bulk", 2, 4, 30)
    stored = await app.get_job(tuned.id)
    assert (stored.queue, stored.priority, stored.max_attempts, stored.timeout_seconds) == ("urgent", 7, 9, 3.5)
    assert stored.correlation_id == "req-1"
    assert (by_name.args, by_name.queue, by_name.priority) == ([3], "late", -1)


async def test_max_attempts_falls_back_to_the_app_setting(database_url: str) -> None:
    app = Conveyor(database_url=database_url, max_attempts=11)

    @app.task
    async def ping(n: int) -> None: ...

    async with app:
        assert (await ping.enqueue(1)).max_attempts == 11


async def test_an_idempotency_key_returns_the_same_job(app: Conveyor) -> None:
    @app.task
    async def ping(n: int) -> None: ...

    first = await ping.using(idempotency_key="order-42").enqueue(1)
    second = await ping.using(idempotency_key="order-42").enqueue(2)

    assert second.id == first.id
    assert second.args == [1]
    assert await stored_count(app) == 1


async def test_option_problems_and_argument_problems_are_reported_together(app: Conveyor) -> None:
    @app.task
    async def ping(n: int) -> None: ...

    naive = datetime(2026, 3, 1, 12, 0)  # noqa: DTZ001 - the point of the test
    with pytest.raises(TaskArgumentsError) as caught:
        await ping.using(delay=-5, run_at=naive, max_attempts=0).enqueue("x")  # ty: ignore[invalid-argument-type]

    problems = caught.value.problems
    assert problems[0].startswith("n: ")
    assert problems[1:] == [
        "max_attempts must be at least 1, not 0",
        "delay must not be negative, not -5",
        "give delay or run_at, not both",
        "run_at must be timezone-aware (e.g. datetime.now(UTC))",
    ]
    assert await stored_count(app) == 0


def test_an_unknown_enqueue_option_is_a_type_error(app: Conveyor) -> None:
    @app.task
    async def ping(n: int) -> None: ...

    with pytest.raises(TypeError, match=r"see Task\.using"):
        ping.using(dellay=5)


def test_every_binding_problem_is_reported_at_once(app: Conveyor) -> None:
    @app.task
    def charge(amount: int, currency: str, *, note: str = "") -> None:
        return None

    with pytest.raises(TaskArgumentsError) as caught:
        charge.job(1, "EUR", 3, colour="red")  # ty: ignore[too-many-positional-arguments, unknown-argument]

    assert caught.value.problems == [
        "takes 2 positional argument(s) but 3 were given",
        "unexpected keyword argument 'colour'",
    ]


async def test_concurrent_single_enqueues_are_all_stored_once_each(app: Conveyor) -> None:
    @app.task
    def note(n: int) -> int:
        return n

    jobs = await asyncio.gather(*(note.enqueue(n) for n in range(50)))
    keyed = await asyncio.gather(*(note.using(idempotency_key="same").enqueue(7) for _ in range(5)))

    stored = (await app.list_jobs(limit=100)).jobs
    assert len({job.id for job in jobs}) == 50
    assert len({job.id for job in keyed}) == 1, "one key, one job, even inside one group commit"
    assert sorted(job.args[0] for job in stored if job.idempotency_key is None) == list(range(50))
    assert len(stored) == 51


def gate_inserts(store: Store) -> tuple[list[int], asyncio.Event]:
    """Record each insert's batch size on ``store``; the first insert waits for the returned event."""
    sizes: list[int] = []
    opened = asyncio.Event()
    insert = store.insert_jobs

    async def gated(new_jobs: Sequence[NewJob], **kwargs: Any) -> list[Job]:
        sizes.append(len(new_jobs))
        if len(sizes) == 1:
            await opened.wait()
        return await insert(new_jobs, **kwargs)

    store.insert_jobs = gated  # ty: ignore[invalid-assignment]
    return sizes, opened


async def test_single_enqueues_that_arrive_during_an_insert_share_the_next_one(app: Conveyor) -> None:
    @app.task
    def note(n: int) -> int:
        return n

    sizes, opened = gate_inserts(await app.store())
    first = asyncio.ensure_future(note.enqueue(0))
    await asyncio.sleep(0)
    rest = asyncio.ensure_future(asyncio.gather(*(note.enqueue(n) for n in range(1, 50))))
    await asyncio.sleep(0.01)
    assert sizes == [1], "the first enqueue inserts at once; the others wait for it"

    opened.set()
    jobs = [await first, *await rest]

    assert sizes == [1, 49]
    assert [job.args[0] for job in jobs] == list(range(50))
    assert await stored_count(app) == 50


@pytest.mark.postgres
async def test_on_postgresql_a_second_enqueue_is_written_while_the_first_waits_for_its_commit(
    postgres_database: str,
) -> None:
    await postgres.truncate(postgres_database)
    app = Conveyor(database_url=postgres_database)

    @app.task
    def note(n: int) -> int:
        return n

    try:
        sizes, opened = gate_inserts(await app.store())
        first = asyncio.ensure_future(note.enqueue(0))
        await asyncio.sleep(0)

        second = await asyncio.wait_for(note.enqueue(1), 10)

        assert sizes == [1, 1], "two inserts out at once, each of its own job"
        opened.set()
        stored = [await app.get_job(job.id) for job in (await first, second)]
        assert [job.args for job in stored] == [[0], [1]]
    finally:
        await app.close()
        await postgres.truncate(postgres_database)  # the database is the whole run's


async def test_an_enqueue_cancelled_during_its_insert_leaves_those_behind_it_stored(app: Conveyor) -> None:
    @app.task
    def note(n: int) -> int:
        return n

    sizes, _ = gate_inserts(await app.store())
    first = asyncio.ensure_future(note.enqueue(0))
    await asyncio.sleep(0)
    behind = asyncio.ensure_future(asyncio.gather(*(note.enqueue(n) for n in (1, 2))))
    await asyncio.sleep(0.01)

    first.cancel()
    jobs = await asyncio.wait_for(behind, timeout=10)

    assert sizes == [1, 2]
    assert sorted(job.args[0] for job in (await app.list_jobs()).jobs) == [1, 2]
    assert [job.args[0] for job in jobs] == [1, 2]
    assert (await note.enqueue(3)).args == [3], "and the next enqueue inserts at once again"
    assert sizes == [1, 2, 1]
