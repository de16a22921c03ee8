"""How long to wait before the next attempt: pure functions of the attempt number."""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass

_MAX_EXPONENT = 1_000

# Jitter draws from a generator of its own, so retries never move the process-wide `random`
# state that an application may have seeded (or a property-based test is drawing from). It is
# reseeded in every forked child, as the module's own is: forked workers must not all draw the
# same waits, which is the herd jitter exists to spread.
_jitter = random.Random()  # noqa: S311 - jitter, not crypto
os.register_at_fork(after_in_child=_jitter.seed)

BackoffFunction = Callable[[int], float]
"""Takes the number of the attempt that just failed (1-based), returns seconds to wait."""


@dataclass(frozen=True, slots=True)
class Exponential:
    """Exponential backoff with full jitter (AWS Architecture Blog, "Exponential Backoff And Jitter").

    The cap for attempt ``n`` is ``min(maximum, base * factor ** (n - 1))``; with ``jitter`` the
    wait is drawn uniformly from ``[0, cap]``, which spreads a thundering herd of retries.
    """

    base: float = 1.0
    factor: float = 2.0
    maximum: float = 3_600.0
    jitter: bool = True

    def __post_init__(self) -> None:
        problems = []
        if self.base < 0:
            problems.append(f"base must be >= 0, not {self.base}")
        if self.factor < 1:
            problems.append(f"factor must be >= 1, not {self.factor}")
        if self.maximum < self.base:
            problems.append(f"maximum ({self.maximum}) must be >= base ({self.base})")
        if problems:
            raise ValueError("; ".join(problems))

    def cap(self, attempt: int) -> float:
        exponent = max(attempt - 1, 0)
        # Past ~1,000 doublings the float overflows; the cap has long been reached by then.
        if exponent > _MAX_EXPONENT:
            return self.maximum
        try:
            return min(self.maximum, self.base * self.factor**exponent)
        except OverflowError:  # a factor above 2 leaves the float range sooner (3.0 ** 999)
            return self.maximum

    def __call__(self, attempt: int) -> float:
        cap = self.cap(attempt)
        return _jitter.uniform(0, cap) if self.jitter else cap


def constant(seconds: float) -> BackoffFunction:
    """The same wait before every retry."""
    if seconds < 0:
        raise ValueError(f"seconds must be >= 0, not {seconds}")
    return lambda _attempt: seconds


DEFAULT_BACKOFF = Exponential()
