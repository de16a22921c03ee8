"""Limits that hold across every worker: per-queue concurrency and per-task rate limits.

Plain data and arithmetic, no I/O: the claim (``conveyor.storage.limits``) reads and writes the
state these describe inside its transaction.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

_RATE = re.compile(r"([1-9][0-9]{0,8})/([smh])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3_600}
_RATE_FORMS = "'N/s', 'N/m' or 'N/h' with N a whole number from 1 to 999999999, e.g. '10/s', '100/m', '1000/h'"

SLOTS_PER_WINDOW = 100
"""Starts are kept per 1/100 of the window, rounded up: a bounded row, and allowance comes back
at most 1 % of the window late."""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def _micros(moment: datetime) -> int:
    return (moment - _EPOCH) // _MICROSECOND


@dataclass(frozen=True, slots=True)
class RateLimit:
    """At most ``count`` attempts start in any ``per_seconds``-long span, across all workers."""

    count: int
    per_seconds: int
    text: str

    def __str__(self) -> str:
        return self.text


def parse_rate_limit(text: str) -> RateLimit:
    """``"100/m"`` -> ``RateLimit(100, 60)``; anything but the exact forms is refused."""
    match = _RATE.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"rate_limit {text!r} is not understood: use {_RATE_FORMS}")
    return RateLimit(count=int(match[1]), per_seconds=_UNIT_SECONDS[match[2]], text=text)


@dataclass(frozen=True, slots=True)
class ClaimLimits:
    """What a claim must respect: running jobs per queue, and starts per task over time."""

    queues: Mapping[str, int] = field(default_factory=dict)
    """Queue name -> most jobs of it running at once, on all workers together."""
    rates: Mapping[str, RateLimit] = field(default_factory=dict)
    """Task name -> its rate limit."""

    def for_queues(self, queues: Sequence[str]) -> ClaimLimits | None:
        """The limits a worker serving ``queues`` must respect; None when there are none.

        Rate limits belong to tasks, whose jobs may be on any queue, so they always apply.
        """
        served = {queue: cap for queue, cap in self.queues.items() if queue in queues}
        if not served and not self.rates:
            return None
        return ClaimLimits(queues=served, rates=dict(self.rates))

    def describe(self) -> dict[str, dict[str, str | int]]:
        """For the worker's start-up log line."""
        return {
            "queue_limits": dict(sorted(self.queues.items())),
            "rate_limits": {task: rate.text for task, rate in sorted(self.rates.items())},
        }


class StartWindow:
    """The starts of one rate-limited task over the last window, as stored in its row.

    A sliding window, exact rather than approximate: a start is kept as the end of the slot it
    fell in (``SLOTS_PER_WINDOW`` slots per window), so it is counted for at least a whole
    window after it happened and never for less. Hence in any span of ``per_seconds`` at most
    ``count`` attempts start. A fixed window would allow twice that across a window boundary,
    and a token bucket ``count`` more in every window after an idle one.
    """

    def __init__(self, rate: RateLimit, stored: Sequence[Sequence[int]], now: datetime) -> None:
        self.rate = rate
        self._window = rate.per_seconds * 1_000_000
        self._slot = max(1, self._window // SLOTS_PER_WINDOW)
        self._now = _micros(now)
        # Kept for a second window: a claim that read the clock a moment before this one may
        # still count them (workers' clocks and lock waits are not perfectly in step).
        self.slots = sorted([int(end), int(started)] for end, started in stored if end + 2 * self._window > self._now)

    def _counted(self) -> list[list[int]]:
        return [slot for slot in self.slots if self._now < slot[0] + self._window]

    @property
    def room(self) -> int:
        """Attempts that may start now."""
        return max(0, self.rate.count - sum(started for _, started in self._counted()))

    def spend(self, started: int) -> None:
        end = -(-self._now // self._slot) * self._slot
        for slot in self.slots:
            if slot[0] == end:
                slot[1] += started
                break
        else:
            self.slots.append([end, started])
            self.slots.sort()

    def room_returns_at(self) -> datetime | None:
        """When at least one attempt may start again; None if one may start now."""
        counted = self._counted()
        over = sum(started for _, started in counted) - self.rate.count
        if over < 0:
            return None
        for end, started in counted:
            over -= started
            if over < 0:
                return _EPOCH + (end + self._window) * _MICROSECOND
        return None  # pragma: no cover - the loop ends with over < 0 whenever there is no room
