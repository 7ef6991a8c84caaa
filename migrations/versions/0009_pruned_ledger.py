"""Folded totals of pruned ledger rows and dead letters; an index to find old ledger rows.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07

Online: runs with the API and workers up. The two new tables are empty until
a retention run with LEDGER_RETENTION_DAYS or DEAD_LETTER_RETENTION_DAYS
prunes rows (app.store.housekeeping). Building ix_batches_processed_at holds
a SHARE lock on batches, so workers' ledger claims wait for it: about a second
per million ledger rows. The downgrade refuses to run once rows were pruned
(their counts would be lost from every ledger sum); empty tables drop cleanly.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

_COUNTERS = ("received", "stored", "duplicates", "failed", "stored_after_horizon")


def upgrade() -> None:
    op.create_table(
        "pruned_batches",
        sa.Column("broker_epoch", sa.Text(), nullable=False),
        sa.Column("batches", sa.BigInteger(), server_default="0", nullable=False),
        *(
            sa.Column(name, sa.BigInteger(), server_default="0", nullable=False)
            for name in _COUNTERS
        ),
        sa.Column("max_broker_seq", sa.BigInteger(), nullable=True),
        sa.Column("pruned_before", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("broker_epoch", name=op.f("pk_pruned_batches")),
    )
    op.create_table(
        "pruned_dead_letters",
        sa.Column("replayed_as", sa.Text(), nullable=False),
        sa.Column("letters", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("pruned_before", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("replayed_as", name=op.f("pk_pruned_dead_letters")),
    )
    op.create_index("ix_batches_processed_at", "batches", ["processed_at"])


def downgrade() -> None:
    pruned = op.get_bind().execute(
        sa.text(
            "SELECT EXISTS (SELECT FROM pruned_batches) OR EXISTS (SELECT FROM pruned_dead_letters)"
        )
    )
    if pruned.scalar_one():
        raise RuntimeError(
            "retention pruned ledger rows or dead letters: their counts live only in"
            " pruned_batches / pruned_dead_letters, so 0009 cannot be downgraded"
        )
    op.drop_index("ix_batches_processed_at", table_name="batches")
    op.drop_table("pruned_dead_letters")
    op.drop_table("pruned_batches")
