"""An index of the jobs set aside (dead, cancelled, waiting) in place of one of every job's state.

The index on (state, queue) took a new entry each time a job changed state: when it was
enqueued, claimed and finished. On PostgreSQL its entries were 12 % of the WAL that a job's
claim and outcome write, and about 8 % of the server's CPU per job in drains. Claims, leases
and the pruner have indexes of their own; what the old index still served was listing jobs by
a state that few of them are in, the dead-letter queue above all, and this partial index
serves that without an entry for a job that runs and succeeds.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-30
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SET_ASIDE = sa.text("state = 'dead' OR state = 'cancelled' OR state = 'waiting'")


def upgrade() -> None:
    op.create_index(
        "ix_conveyor_jobs_set_aside",
        "conveyor_jobs",
        ["state", "id"],
        sqlite_where=SET_ASIDE,
        postgresql_where=SET_ASIDE,
    )
    op.drop_index("ix_conveyor_jobs_state_queue", table_name="conveyor_jobs")


def downgrade() -> None:
    op.create_index("ix_conveyor_jobs_state_queue", "conveyor_jobs", ["state", "queue"])
    op.drop_index("ix_conveyor_jobs_set_aside", table_name="conveyor_jobs")
