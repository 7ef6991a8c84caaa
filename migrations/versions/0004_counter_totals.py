"""Striped totals for constant-time /stats, and a code-point index for topic prefixes.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02

Offline: stop the workers (let the queue wait on the broker) while this runs.
The totals are filled from topic_stats in this transaction; a worker of the
previous version committing meanwhile would add to topic_stats but not to the
totals. The API can keep accepting.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "counter_totals",
        sa.Column("stripe", sa.SmallInteger(), nullable=False),
        sa.Column("received", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("stored", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("duplicates", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("failed", sa.BigInteger(), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint("stripe", name="pk_counter_totals"),
    )
    op.execute(
        "INSERT INTO counter_totals (stripe, received, stored, duplicates, failed)"
        " SELECT 0, coalesce(sum(received), 0), coalesce(sum(stored), 0),"
        " coalesce(sum(duplicates), 0), coalesce(sum(failed), 0) FROM topic_stats"
    )
    op.create_index("ix_topic_stats_topic_c", "topic_stats", [sa.text('topic COLLATE "C"')])


def downgrade() -> None:
    op.drop_index("ix_topic_stats_topic_c", table_name="topic_stats")
    op.drop_table("counter_totals")
