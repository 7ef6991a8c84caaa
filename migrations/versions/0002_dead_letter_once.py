"""Keep one dead letter per batch and key, so a redelivered poison batch adds none.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Drop copies an earlier redelivery may have left, keeping the first.
    op.execute(
        """
        DELETE FROM dead_letters d USING dead_letters older
        WHERE d.batch_id = older.batch_id AND d.topic = older.topic
          AND d.event_id = older.event_id AND d.id > older.id
        """
    )
    op.create_unique_constraint(
        "uq_dead_letters_batch_id_topic_event_id", "dead_letters", ["batch_id", "topic", "event_id"]
    )


def downgrade() -> None:
    op.drop_constraint("uq_dead_letters_batch_id_topic_event_id", "dead_letters", type_="unique")
