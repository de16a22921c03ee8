"""The runnable index in claim order on SQLite too; key indexes only for jobs that have the key.

SQLite's copy of the runnable index lost ``priority DESC`` when an earlier migration rebuilt the
table, so a claim (priority descending, then due time and id ascending) sorted every due job of
the queue instead of reading the first few off the index. The workflow index and the idempotency
key's unique constraint held an entry for every job, with the key or not, and every change of a
job (claimed, finished) wrote one more to each: now they index the jobs that have the key.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

RUNNABLE = sa.text("state IN ('queued', 'scheduled', 'retrying')")
IN_A_WORKFLOW = sa.text("workflow_id IS NOT NULL")
HAS_IDEMPOTENCY_KEY = sa.text("idempotency_key IS NOT NULL")


def _runnable_index(priority: sa.ColumnElement[object] | str) -> None:
    op.create_index(
        "ix_conveyor_jobs_runnable",
        "conveyor_jobs",
        ["queue", priority, "run_at", "id"],
        sqlite_where=RUNNABLE,
        postgresql_where=RUNNABLE,
    )


def upgrade() -> None:
    # First: on SQLite dropping a constraint rebuilds the table, and the rebuild loses DESC.
    with op.batch_alter_table("conveyor_jobs") as batch:
        batch.drop_constraint("uq_conveyor_jobs_idempotency_key", type_="unique")
    op.create_index(
        "uq_conveyor_jobs_idempotency_key",
        "conveyor_jobs",
        ["idempotency_key"],
        unique=True,
        sqlite_where=HAS_IDEMPOTENCY_KEY,
        postgresql_where=HAS_IDEMPOTENCY_KEY,
    )
    if op.get_bind().dialect.name == "sqlite":
        op.drop_index("ix_conveyor_jobs_runnable", table_name="conveyor_jobs")
        _runnable_index(sa.literal_column("priority DESC"))
    op.drop_index("ix_conveyor_jobs_workflow_id", table_name="conveyor_jobs")
    op.create_index(
        "ix_conveyor_jobs_workflow_id",
        "conveyor_jobs",
        ["workflow_id"],
        sqlite_where=IN_A_WORKFLOW,
        postgresql_where=IN_A_WORKFLOW,
    )


def downgrade() -> None:
    op.drop_index("ix_conveyor_jobs_workflow_id", table_name="conveyor_jobs")
    op.create_index("ix_conveyor_jobs_workflow_id", "conveyor_jobs", ["workflow_id"])
    op.drop_index("uq_conveyor_jobs_idempotency_key", table_name="conveyor_jobs")
    with op.batch_alter_table("conveyor_jobs") as batch:
        batch.create_unique_constraint("uq_conveyor_jobs_idempotency_key", ["idempotency_key"])
    if op.get_bind().dialect.name == "sqlite":
        op.drop_index("ix_conveyor_jobs_runnable", table_name="conveyor_jobs")
        _runnable_index("priority")
