"""``conveyor worker --processes N``: one command, forked worker processes, one supervisor."""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from tests.support import postgres
from tests.support import tasks as support
from tests.support.processes import WorkerProcess
from tests.support.waiting import eventually

from conveyor import Conveyor, Job, JobState
from conveyor.engine.processes import GRACEFUL, IMMEDIATE, ListeningTurn, follow_supervisor

pytestmark = [
    pytest.mark.skipif(sys.platform != "linux", reason="forked workers, watched through /proc"),
    pytest.mark.integration,
    pytest.mark.slow,
]


@pytest.fixture
def supervisors(tmp_path: Path) -> Iterator[list[WorkerProcess]]:
    """``conveyor worker --processes ...`` commands; whatever is left of them is killed at the end."""
    started: list[WorkerProcess] = []
    yield started
    for supervisor in started:
        pids = _worker_pids(supervisor)
        supervisor.kill()
        for pid in pids:
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)


def _start(
    supervisors: list[WorkerProcess], tmp_path: Path, database_url: str, processes: int = 2, **settings: str
) -> tuple[WorkerProcess, list[int]]:
    """``conveyor worker --processes N``, once all N workers have started; and the workers' pids."""
    supervisor = WorkerProcess(
        tmp_path / f"supervisor-{len(supervisors)}.log", database_url, ["--processes", str(processes)], **settings
    )
    supervisors.append(supervisor)
    _wait_for_events(supervisor, "worker.started", processes)
    return supervisor, _worker_pids(supervisor)


def _wait_for_events(process: WorkerProcess, name: str, count: int, timeout: float = 120) -> list[dict]:
    process.wait_for_event(lambda _: sum(event.get("event") == name for event in process.events()) >= count, timeout)
    return [event for event in process.events() if event.get("event") == name]


def _worker_pids(supervisor: WorkerProcess) -> list[int]:
    return [event["pid"] for event in supervisor.events() if event.get("event") == "worker.process_started"]


def _gone(pid: int) -> bool:
    """Exited: no such process, or a zombie that nobody has reaped yet."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in {"Z", "X"}


def _ran_in(job: Job) -> int:
    worker = job.history[-1].worker
    assert worker is not None
    return int(worker.split(":")[1])


async def _all_gone(pids: list[int]) -> bool:
    return all(_gone(pid) for pid in pids)


async def _started(effects_path: Path, count: int) -> bool:
    return sum(line.startswith("start") for line in support.read_effects(effects_path)) >= count


async def test_one_command_runs_jobs_in_several_worker_processes(
    tmp_path: Path, database_url: str, effects_path: Path, supervisors: list[WorkerProcess], app: Conveyor
) -> None:
    effect = app.task(name="effect")(support.effect.fn)
    supervisor, pids = _start(supervisors, tmp_path, database_url, concurrency="5", poll_interval_seconds="0.05")
    jobs = await app.enqueue_many([effect.job(n) for n in range(200)])

    finished = [await app.wait_for_job(job.id, timeout=60) for job in jobs]

    assert {job.state for job in finished} == {JobState.SUCCEEDED}
    runs = collections.Counter(line.split()[0] for line in support.read_effects(effects_path))
    assert set(runs) == {job.id for job in jobs}
    assert set(runs.values()) == {1}, "each job ran once"
    assert {_ran_in(job) for job in finished} == set(pids), "both forked processes took a share, the supervisor none"
    assert supervisor.pid not in pids
    assert supervisor.stop() == 0
    assert await _all_gone(pids)


async def test_a_stop_signalled_to_every_process_at_once_still_lets_running_jobs_finish(
    tmp_path: Path, database_url: str, effects_path: Path, supervisors: list[WorkerProcess], app: Conveyor
) -> None:
    # As systemd's default KillMode and Ctrl+C in a terminal do: the workers get the signal
    # directly as well as through the supervisor, and must count it once.
    slow_effect = app.task(name="slow_effect")(support.slow_effect.fn)
    supervisor, pids = _start(supervisors, tmp_path, database_url, concurrency="2", shutdown_grace_seconds="10")
    jobs = await app.enqueue_many([slow_effect.job(1.0) for _ in range(4)])
    await eventually(lambda: _started(effects_path, 4), timeout=60)

    for pid in [supervisor.pid, *pids]:
        os.kill(pid, signal.SIGTERM)

    assert supervisor.process.wait(30) == 0
    supervisor.stop()
    for job in [await app.get_job(job.id) for job in jobs]:
        assert (job.state, job.attempt) == (JobState.SUCCEEDED, 1), supervisor.log_text()
    stops = [event for event in supervisor.events() if event.get("event") == "worker.signal" and "immediate" in event]
    assert stops, "the workers heard the signal themselves"
    assert not any(event["immediate"] for event in stops)
    assert await _all_gone(pids)


async def test_a_killed_worker_process_is_replaced(
    tmp_path: Path, database_url: str, supervisors: list[WorkerProcess], app: Conveyor
) -> None:
    noop = app.task(name="noop")(support.noop.fn)
    supervisor, (victim, survivor) = _start(supervisors, tmp_path, database_url, poll_interval_seconds="0.05")

    os.kill(victim, signal.SIGKILL)

    replacement = _wait_for_events(supervisor, "worker.process_started", 3)[-1]
    killed = _wait_for_events(supervisor, "worker.process_killed", 1)[0]
    assert (killed["pid"], killed["signal"]) == (victim, "SIGKILL")
    assert replacement["index"] == killed["index"]
    assert replacement["pid"] not in (victim, survivor)
    _wait_for_events(supervisor, "worker.started", 3)
    job = await noop.enqueue(7)
    assert (await app.wait_for_job(job.id, timeout=60)).result == 7
    assert supervisor.stop() == 0
    assert await _all_gone([survivor, replacement["pid"]])


async def test_a_worker_process_that_fails_by_itself_stops_the_command_with_its_exit_code(
    tmp_path: Path, supervisors: list[WorkerProcess]
) -> None:
    # A database the workers cannot open fails every one of them the same way: restarting
    # them would only repeat it.
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    supervisor = WorkerProcess(tmp_path / "supervisor.log", f"sqlite:///{blocked / 'conveyor.db'}", ["-p", "2"])
    supervisors.append(supervisor)

    code = supervisor.process.wait(120)

    failed = [event for event in supervisor.events() if event.get("event") == "worker.process_failed"]
    assert failed, supervisor.log_text()
    assert code == failed[0]["exit_code"] != 0
    assert not any(event.get("event") == "worker.process_killed" for event in supervisor.events())
    assert await _all_gone(_worker_pids(supervisor))


async def test_workers_whose_supervisor_was_killed_stop_by_themselves(
    tmp_path: Path, database_url: str, supervisors: list[WorkerProcess]
) -> None:
    supervisor, pids = _start(supervisors, tmp_path, database_url)

    supervisor.process.send_signal(signal.SIGKILL)
    supervisor.process.wait(10)

    await eventually(lambda: _all_gone(pids), timeout=60)
    assert sum(event.get("event") == "worker.stopped" for event in supervisor.events()) == 2


class _Recorder:
    """What ``follow_supervisor`` asks of a worker, recorded."""

    def __init__(self) -> None:
        self.requests: list[bool] = []
        self.stopping = False
        self.changed = asyncio.Event()

    def stop(self, *, immediate: bool = False) -> None:
        self.requests.append(immediate)
        self.stopping = True
        self.changed.set()

    async def next_request(self) -> None:
        await asyncio.wait_for(self.changed.wait(), 10)
        self.changed.clear()


async def test_a_forked_worker_stops_gracefully_once_then_at_once_as_its_supervisor_says() -> None:
    read_end, write_end = os.pipe()
    worker = _Recorder()
    follow_supervisor(read_end, worker)
    try:
        os.write(write_end, GRACEFUL)
        await worker.next_request()
        os.write(write_end, GRACEFUL)  # the same signal, come the other way: not a second stop
        os.write(write_end, IMMEDIATE)
        await worker.next_request()
        assert worker.requests == [False, True]
    finally:
        asyncio.get_running_loop().remove_reader(read_end)
        os.close(read_end)
        os.close(write_end)


async def test_a_forked_worker_stops_gracefully_when_its_supervisor_is_gone() -> None:
    read_end, write_end = os.pipe()
    worker = _Recorder()
    follow_supervisor(read_end, worker)
    try:
        os.close(write_end)
        await worker.next_request()
        assert worker.requests == [False]
    finally:
        os.close(read_end)


# -- the listening turn (PostgreSQL) -----------------------------------------------------------
# Each of these workers looks for jobs by itself only once a minute: a job that starts sooner was
# announced to the one process listening, or handed on by it.
_DEAF = "60"


@pytest.fixture
async def pg_app(postgres_database: str) -> AsyncIterator[Conveyor]:
    postgres.run_sync(postgres.truncate(postgres_database))
    app = Conveyor(database_url=postgres_database)
    yield app
    await app.close()


@pytest.mark.postgres
async def test_one_idle_worker_process_listens_and_takes_jobs_that_come_one_by_one(
    tmp_path: Path, postgres_database: str, supervisors: list[WorkerProcess], pg_app: Conveyor
) -> None:
    noop = pg_app.task(name="noop")(support.noop.fn)
    supervisor, pids = _start(supervisors, tmp_path, postgres_database, 3, concurrency="4", poll_interval_seconds=_DEAF)

    finished = [await pg_app.wait_for_job((await noop.enqueue(n)).id, timeout=30) for n in range(6)]

    assert [job.result for job in finished] == list(range(6))
    listener = {_ran_in(job) for job in finished}
    assert len(listener) == 1, "one process was woken for each job, not all three"
    assert listener < set(pids)
    assert supervisor.stop() == 0


@pytest.mark.postgres
async def test_a_listening_worker_process_with_more_than_it_takes_wakes_the_others(
    tmp_path: Path, postgres_database: str, supervisors: list[WorkerProcess], pg_app: Conveyor
) -> None:
    noop = pg_app.task(name="noop")(support.noop.fn)
    slow_effect = pg_app.task(name="slow_effect")(support.slow_effect.fn)
    supervisor, pids = _start(
        supervisors,
        tmp_path,
        postgres_database,
        3,
        concurrency="2",
        claim_batch_size="2",
        poll_interval_seconds=_DEAF,
    )
    await pg_app.wait_for_job((await noop.enqueue(0)).id, timeout=30)  # one of them listens now

    burst = await pg_app.enqueue_many([slow_effect.job(0.3) for _ in range(12)])

    finished = [await pg_app.wait_for_job(job.id, timeout=30) for job in burst]
    assert {job.state for job in finished} == {JobState.SUCCEEDED}
    assert {_ran_in(job) for job in finished} == set(pids), "each process took a share of the burst"
    assert supervisor.stop() == 0


@pytest.mark.postgres
async def test_when_the_listening_worker_process_is_killed_another_listens_at_once(
    tmp_path: Path, postgres_database: str, supervisors: list[WorkerProcess], pg_app: Conveyor
) -> None:
    noop = pg_app.task(name="noop")(support.noop.fn)
    supervisor, pids = _start(supervisors, tmp_path, postgres_database, 2, poll_interval_seconds=_DEAF)
    listener = _ran_in(await pg_app.wait_for_job((await noop.enqueue(1)).id, timeout=30))

    os.kill(listener, signal.SIGKILL)
    _wait_for_events(supervisor, "worker.process_killed", 1)
    job = await pg_app.wait_for_job((await noop.enqueue(2)).id, timeout=30)

    # The replacement starts a second later; the other worker heard of the job long before.
    (survivor,) = set(pids) - {listener}
    assert (job.result, _ran_in(job)) == (2, survivor)
    assert supervisor.stop() == 0


def _in_child(turn: ListeningTurn, took: int, release: int) -> int:  # pragma: no cover - runs forked
    os.write(took, b"y" if turn.take() else b"n")
    os.read(release, 1)
    return 0


async def test_the_listening_turn_is_held_by_one_process_at_a_time_and_freed_when_it_dies() -> None:
    turn = ListeningTurn()
    took_read, took_write = os.pipe()
    release_read, release_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os._exit(_in_child(turn, took_write, release_read))
    try:
        assert os.read(took_read, 1) == b"y"
        assert not turn.take(), "the other process holds it"
        os.write(release_write, b"x")
        os.waitpid(pid, 0)
        assert turn.take(), "the kernel freed it with its holder"
        assert turn.take(), "held already"
        turn.give_up()
        assert not turn.held
    finally:
        turn.close()
        for end in (took_read, took_write, release_read, release_write):
            os.close(end)


async def test_a_worker_waiting_for_the_turn_wakes_on_a_poke_but_not_on_one_it_forgot() -> None:
    turn = ListeningTurn()
    news = asyncio.Event()
    loop = asyncio.get_running_loop()
    try:
        turn.poke()
        turn.forget_pokes()

        started = loop.time()
        await turn.wait_for_poke(0.05, news)
        assert loop.time() - started >= 0.04, "an old poke was forgotten: the wait ran to its timeout"

        waiting = asyncio.create_task(turn.wait_for_poke(30, news))
        turn.poke()
        await asyncio.wait_for(waiting, 10)

        waiting = asyncio.create_task(turn.wait_for_poke(30, news))
        news.set()
        await asyncio.wait_for(waiting, 10)
    finally:
        turn.close()
