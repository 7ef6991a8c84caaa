"""Record how far a broker may accept before its next check, since when it is idle, and loss bounds.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04

Online: adds two columns with constant defaults (no rewrite). Existing
checkpoints get an allowance equal to what they had seen accepted. API
processes of earlier versions accept without an allowance, so during a rolling
upgrade a loss's upper bound covers only what the new ones allowed; stop the
old API processes first where that matters.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "broker_checkpoints",
        sa.Column("allowed_events", sa.BigInteger(), nullable=False, server_default="0"),
    )
    op.execute("UPDATE broker_checkpoints SET allowed_events = accepted_events")
    op.add_column(
        "broker_checkpoints",
        sa.Column(
            "accepted_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.text("now()"),
        ),
    )
    op.add_column(
        "broker_losses",
        sa.Column("events_known_unstored", sa.BigInteger(), nullable=False, server_default="0"),
    )
    op.execute("UPDATE broker_losses SET events_known_unstored = events_unaccounted")


def downgrade() -> None:
    op.drop_column("broker_losses", "events_known_unstored")
    op.drop_column("broker_checkpoints", "accepted_at")
    op.drop_column("broker_checkpoints", "allowed_events")
