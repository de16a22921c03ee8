"""Create conveyor_jobs.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the column types as they were at this revision: a migration must not
# change meaning when the application's schema module moves on.
# JSON lives in TEXT on SQLite: a column declared JSON would get NUMERIC affinity there.
JSON = sa.JSON().with_variant(sa.Text(), "sqlite").with_variant(postgresql.JSONB(), "postgresql")
TIMESTAMP = sa.DateTime(timezone=True)
RUNNABLE = sa.text("state IN ('queued', 'scheduled', 'retrying')")


def upgrade() -> None:
    op.create_table(
        "conveyor_jobs",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("task", sa.String(length=255), nullable=False),
        sa.Column("queue", sa.String(length=255), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("args", JSON, nullable=False),
        sa.Column("kwargs", JSON, nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("timeout_seconds", sa.Float(), nullable=True),
        sa.Column("run_at", TIMESTAMP, nullable=False),
        sa.Column("lease_owner", sa.String(length=255), nullable=True),
        sa.Column("lease_expires_at", TIMESTAMP, nullable=True),
        sa.Column("attempted_at", TIMESTAMP, nullable=True),
        sa.Column("finished_at", TIMESTAMP, nullable=True),
        sa.Column("result", JSON, nullable=True),
        sa.Column("error", JSON, nullable=True),
        sa.Column("history", JSON, nullable=False),
        sa.Column("idempotency_key", sa.String(length=255), nullable=True),
        sa.Column("correlation_id", sa.String(length=255), nullable=True),
        sa.Column("workflow_id", sa.String(length=36), nullable=True),
        sa.Column("parent_id", sa.String(length=36), nullable=True),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
        sa.CheckConstraint(
            "state IN ('scheduled', 'queued', 'running', 'retrying', 'succeeded', 'dead', 'cancelled')",
            name=op.f("ck_conveyor_jobs_state"),
        ),
        sa.CheckConstraint("attempt >= 0 AND max_attempts >= 1", name=op.f("ck_conveyor_jobs_attempts")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_conveyor_jobs")),
        sa.UniqueConstraint("idempotency_key", name=op.f("uq_conveyor_jobs_idempotency_key")),
    )
    op.create_index(
        "ix_conveyor_jobs_runnable",
        "conveyor_jobs",
        ["queue", sa.literal_column("priority DESC"), "run_at", "id"],
        sqlite_where=RUNNABLE,
        postgresql_where=RUNNABLE,
    )
    op.create_index(
        "ix_conveyor_jobs_leases",
        "conveyor_jobs",
        ["lease_expires_at"],
        sqlite_where=sa.text("state = 'running'"),
        postgresql_where=sa.text("state = 'running'"),
    )
    op.create_index(
        "ix_conveyor_jobs_finished",
        "conveyor_jobs",
        ["finished_at"],
        sqlite_where=sa.text("finished_at IS NOT NULL"),
        postgresql_where=sa.text("finished_at IS NOT NULL"),
    )
    op.create_index("ix_conveyor_jobs_state_queue", "conveyor_jobs", ["state", "queue"])
    op.create_index("ix_conveyor_jobs_workflow_id", "conveyor_jobs", ["workflow_id"])


def downgrade() -> None:
    op.drop_table("conveyor_jobs")
