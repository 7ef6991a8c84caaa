"""Order the log by a position taken in commit order, instead of (txid, id) behind a horizon.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02

Offline: stop the workers while this runs (it rewrites every row of events to
give it a position, in the (txid, id) order readers used until now; minutes
for tens of millions of rows). The API may keep accepting. Cursors issued
before keep working: a (txid, id) cursor is translated to the position of the
last row at or before it.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE SEQUENCE events_position_seq AS bigint")
    op.add_column("events", sa.Column("position", sa.BigInteger(), nullable=True))
    op.execute(
        "UPDATE events SET position = ordered.n FROM ("
        " SELECT id, row_number() OVER (ORDER BY txid, id) AS n FROM events"
        ") AS ordered WHERE events.id = ordered.id"
    )
    op.execute(
        "SELECT setval('events_position_seq', coalesce((SELECT max(position) FROM events), 0) + 1,"
        " false)"
    )
    op.execute("ALTER SEQUENCE events_position_seq OWNED BY events.position")
    op.alter_column(
        "events",
        "position",
        nullable=False,
        server_default=sa.text("nextval('events_position_seq')"),
    )
    op.create_index("ix_events_position", "events", ["position"], unique=True)
    op.create_index("ix_events_topic_position", "events", ["topic", "position"])


def downgrade() -> None:
    op.drop_index("ix_events_topic_position", table_name="events")
    op.drop_index("ix_events_position", table_name="events")
    op.drop_column("events", "position")  # drops the sequence it owns
