"""Oban for Python (PyPI ``oban``, the port of Elixir's Oban; PostgreSQL): not benchmarked here.

Every release on PyPI (0.5.0 to 0.7.0) requires Python >= 3.12, and this project and its
machines run Python 3.11, so it does not install (``uv add --group bench oban`` fails to
resolve). The system is listed so that the results say why it is missing; port it here (same
interface as the other modules) once the benchmark runs on Python 3.12 or later.
"""

from __future__ import annotations

import sys

from benchmarks.systems.base import PostgresSystem, UnavailableError

REASON = (
    "oban (the Python port of Oban) requires Python >= 3.12 in every release on PyPI (0.5.0-0.7.0); "
    f"this machine runs Python {sys.version.split()[0]}"
)


class ObanPg(PostgresSystem):
    name = "oban"
    label = "Oban for Python (PostgreSQL)"
    distribution = "oban"

    def version(self) -> str:
        raise UnavailableError(REASON)

    def configuration(self) -> dict[str, str]:
        return {}

    async def prepare(self) -> None:
        raise UnavailableError(REASON)
