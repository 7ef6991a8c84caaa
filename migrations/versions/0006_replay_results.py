"""Record what each replay of a dead letter did, so /metrics can count by first outcome.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02

Online: adds a nullable column (no rewrite) and fills it for letters already
replayed, which are few. Workers and API may keep running. Letters replayed
before this migration are recorded as stored (the usual result; which it was
is not known any more).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("dead_letters", sa.Column("replayed_as", sa.Text(), nullable=True))
    op.execute("UPDATE dead_letters SET replayed_as = 'stored' WHERE replayed_at IS NOT NULL")
    op.create_check_constraint(
        op.f("ck_dead_letters_replay_result"),
        "dead_letters",
        "(replayed_at IS NULL AND replayed_as IS NULL)"
        " OR (replayed_at IS NOT NULL AND replayed_as IN ('stored', 'duplicate'))",
    )


def downgrade() -> None:
    op.drop_constraint(op.f("ck_dead_letters_replay_result"), "dead_letters", type_="check")
    op.drop_column("dead_letters", "replayed_as")
