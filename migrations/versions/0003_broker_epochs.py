"""Record which acceptance each batch was, broker checkpoints and detected broker data loss.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02

Online: adds two nullable columns (no table rewrite), an index and two tables.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("batches", sa.Column("broker_epoch", sa.Text(), nullable=True))
    op.add_column("batches", sa.Column("broker_seq", sa.BigInteger(), nullable=True))
    op.create_index("ix_batches_broker_epoch_broker_seq", "batches", ["broker_epoch", "broker_seq"])
    op.create_table(
        "broker_checkpoints",
        sa.Column("broker", sa.Text(), nullable=False),
        sa.Column("epoch", sa.Text(), nullable=False),
        sa.Column("seq", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("accepted_events", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column(
            "checked_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("broker", name="pk_broker_checkpoints"),
    )
    op.create_table(
        "broker_losses",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("broker", sa.Text(), nullable=False),
        sa.Column("lost_epoch", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("seq_known", sa.BigInteger(), nullable=False),
        sa.Column("seq_found", sa.BigInteger(), nullable=True),
        sa.Column("events_unaccounted", sa.BigInteger(), nullable=False),
        sa.Column(
            "detected_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("acknowledged_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_broker_losses"),
        sa.UniqueConstraint("broker", "lost_epoch", name="uq_broker_losses_broker_lost_epoch"),
    )


def downgrade() -> None:
    op.drop_table("broker_losses")
    op.drop_table("broker_checkpoints")
    op.drop_index("ix_batches_broker_epoch_broker_seq", table_name="batches")
    op.drop_column("batches", "broker_seq")
    op.drop_column("batches", "broker_epoch")
