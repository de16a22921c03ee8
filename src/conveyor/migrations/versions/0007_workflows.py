"""Workflows: the waiting state, dependency edges between jobs, and the workflow record.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(sa.Text(), "sqlite").with_variant(postgresql.JSONB(), "postgresql")
TIMESTAMP = sa.DateTime(timezone=True)

STATES_BEFORE = "state IN ('scheduled', 'queued', 'running', 'retrying', 'succeeded', 'dead', 'cancelled')"
STATES_AFTER = "state IN ('scheduled', 'queued', 'running', 'retrying', 'succeeded', 'dead', 'cancelled', 'waiting')"
UNFINISHED_BEFORE = sa.text("unique_key IS NOT NULL AND state IN ('scheduled', 'queued', 'running', 'retrying')")
UNFINISHED_AFTER = sa.text(
    "unique_key IS NOT NULL AND state IN ('scheduled', 'queued', 'running', 'retrying', 'waiting')"
)


def _unique_key_index(where: sa.TextClause) -> None:
    op.create_index(
        "uq_conveyor_jobs_unique_key_unfinished",
        "conveyor_jobs",
        ["unique_key"],
        unique=True,
        sqlite_where=where,
        postgresql_where=where,
    )


def upgrade() -> None:
    op.drop_index("uq_conveyor_jobs_unique_key_unfinished", table_name="conveyor_jobs")
    with op.batch_alter_table("conveyor_jobs") as batch:
        batch.add_column(sa.Column("waiting_on", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("input_template", JSON, nullable=True))
        batch.drop_constraint(op.f("ck_conveyor_jobs_state"), type_="check")
        batch.create_check_constraint(op.f("ck_conveyor_jobs_state"), sa.text(STATES_AFTER))
    _unique_key_index(UNFINISHED_AFTER)
    op.create_table(
        "conveyor_workflows",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=True),
        sa.Column("structure", JSON, nullable=False),
        sa.Column("output", JSON, nullable=False),
        sa.Column("correlation_id", sa.String(length=255), nullable=True),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_conveyor_workflows")),
    )
    op.create_index("ix_conveyor_workflows_created_at", "conveyor_workflows", ["created_at"])
    op.create_table(
        "conveyor_job_dependencies",
        sa.Column("dependency_id", sa.String(length=36), nullable=False),
        sa.Column("dependent_id", sa.String(length=36), nullable=False),
        sa.PrimaryKeyConstraint("dependency_id", "dependent_id", name=op.f("pk_conveyor_job_dependencies")),
    )
    op.create_index("ix_conveyor_job_dependencies_dependent_id", "conveyor_job_dependencies", ["dependent_id"])


def downgrade() -> None:
    op.drop_index("ix_conveyor_job_dependencies_dependent_id", table_name="conveyor_job_dependencies")
    op.drop_table("conveyor_job_dependencies")
    op.drop_index("ix_conveyor_workflows_created_at", table_name="conveyor_workflows")
    op.drop_table("conveyor_workflows")
    op.drop_index("uq_conveyor_jobs_unique_key_unfinished", table_name="conveyor_jobs")
    # Jobs still waiting on a workflow have no state to go back to: they are cancelled.
    op.execute("UPDATE conveyor_jobs SET state = 'cancelled' WHERE state = 'waiting'")
    with op.batch_alter_table("conveyor_jobs") as batch:
        batch.drop_constraint(op.f("ck_conveyor_jobs_state"), type_="check")
        batch.create_check_constraint(op.f("ck_conveyor_jobs_state"), sa.text(STATES_BEFORE))
        batch.drop_column("input_template")
        batch.drop_column("waiting_on")
    _unique_key_index(UNFINISHED_BEFORE)
