"""Backoff: pure functions from the failed attempt's number to seconds."""

from __future__ import annotations

import multiprocessing
import random

import pytest

from conveyor.backoff import DEFAULT_BACKOFF, Exponential, constant


def test_exponential_cap_grows_by_the_factor_each_attempt() -> None:
    backoff = Exponential(base=0.5, factor=3, maximum=1_000, jitter=False)

    assert [backoff.cap(attempt) for attempt in range(1, 6)] == [0.5, 1.5, 4.5, 13.5, 40.5]
    assert [backoff(attempt) for attempt in range(1, 6)] == [0.5, 1.5, 4.5, 13.5, 40.5]


def test_exponential_cap_is_bounded_by_the_maximum() -> None:
    backoff = Exponential(base=1, factor=2, maximum=100, jitter=False)

    assert backoff(7) == 64
    assert backoff(8) == 100
    assert backoff(50) == 100


def test_attempt_zero_or_below_waits_the_base() -> None:
    backoff = Exponential(base=2, factor=2, maximum=100, jitter=False)

    assert backoff(0) == 2
    assert backoff(-5) == 2


def test_jitter_stays_within_zero_and_the_cap_and_spreads_out() -> None:
    backoff = Exponential(base=1, factor=2, maximum=60)

    for attempt in (1, 3, 6, 12):
        cap = backoff.cap(attempt)
        waits = [backoff(attempt) for _ in range(300)]
        assert all(0 <= wait <= cap for wait in waits), attempt
        # Full jitter: uniform over [0, cap]; 300 draws all inside half the range is (1/2)**299-unlikely.
        assert max(waits) - min(waits) > cap / 2, attempt


@pytest.mark.parametrize(
    "backoff",
    [
        DEFAULT_BACKOFF,
        Exponential(base=1, factor=2, maximum=3_600, jitter=False),
        Exponential(base=0.1, factor=3, maximum=600, jitter=False),
        Exponential(base=1, factor=2.5, maximum=600, jitter=False),
        Exponential(base=1, factor=10, maximum=86_400),
    ],
    ids=["default", "factor-2", "factor-3", "factor-2.5", "factor-10-jitter"],
)
@pytest.mark.parametrize("attempt", [400, 1_000, 1_001, 5_000, 10**9])
def test_a_huge_attempt_number_waits_the_maximum_without_overflowing(backoff: Exponential, attempt: int) -> None:
    assert backoff.cap(attempt) == backoff.maximum
    assert 0 <= backoff(attempt) <= backoff.maximum


def test_bad_exponential_parameters_raise_one_error_listing_every_problem() -> None:
    with pytest.raises(ValueError) as caught:
        Exponential(base=-1, factor=0.5, maximum=-2)

    message = str(caught.value)
    assert "base must be >= 0, not -1" in message
    assert "factor must be >= 1, not 0.5" in message
    assert "maximum (-2) must be >= base (-1)" in message


def test_maximum_below_base_is_refused() -> None:
    with pytest.raises(ValueError, match=r"maximum \(1\) must be >= base \(5\)"):
        Exponential(base=5, maximum=1)


def test_constant_waits_the_same_before_every_retry() -> None:
    backoff = constant(2.5)

    assert [backoff(attempt) for attempt in (1, 2, 10, 5_000)] == [2.5, 2.5, 2.5, 2.5]
    assert constant(0)(3) == 0


def test_constant_refuses_a_negative_wait() -> None:
    with pytest.raises(ValueError, match="seconds must be >= 0, not -1"):
        constant(-1)


def test_jitter_leaves_the_process_wide_random_state_alone() -> None:
    random.seed(7731)  # as an application seeding its own draws would
    state = random.getstate()

    waits = [Exponential(base=1, maximum=1_000)(attempt) for attempt in range(1, 20)]

    assert random.getstate() == state
    assert len(set(waits)) > 1, "the waits are still jittered"


def _jittered_waits() -> list[float]:
    return [Exponential(base=1, maximum=1_000)(10) for _ in range(5)]


def test_forked_worker_processes_draw_different_waits() -> None:
    # Without a new seed in the child, both would go on from the same state: the same waits,
    # the herd of retries that jitter exists to spread.
    with multiprocessing.get_context("fork").Pool(1) as pool:
        child = pool.apply(_jittered_waits)

    assert child != _jittered_waits()
