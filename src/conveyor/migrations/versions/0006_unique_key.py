"""Add unique_key to jobs: at most one unfinished job per key.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UNFINISHED = sa.text("unique_key IS NOT NULL AND state IN ('scheduled', 'queued', 'running', 'retrying')")


def upgrade() -> None:
    with op.batch_alter_table("conveyor_jobs") as batch:
        batch.add_column(sa.Column("unique_key", sa.String(length=255), nullable=True))
    op.create_index(
        "uq_conveyor_jobs_unique_key_unfinished",
        "conveyor_jobs",
        ["unique_key"],
        unique=True,
        sqlite_where=UNFINISHED,
        postgresql_where=UNFINISHED,
    )


def downgrade() -> None:
    op.drop_index("uq_conveyor_jobs_unique_key_unfinished", table_name="conveyor_jobs")
    with op.batch_alter_table("conveyor_jobs") as batch:
        batch.drop_column("unique_key")
