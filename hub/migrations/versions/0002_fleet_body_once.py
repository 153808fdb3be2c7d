"""fleet_messages.body is NULL where fleet_windows holds the same message's body

A summary or drift message was stored twice, the raw message in fleet_messages and its window,
body included, in fleet_windows: 8.4 kB per message on SQLite. Now the body of a message with a
window is kept in fleet_windows only, and fleet_messages.body is NULL for it (the store reads it
through the window; before a window expires its body is copied back to a message that outlives
it). Upgrade: the column becomes nullable and the bodies that fleet_windows holds identically
are cleared (both tables were written with the same encoding). Downgrade: they are copied back.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27 17:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None

_SAME_MESSAGE = "w.device_id = fleet_messages.device_id AND w.seq = fleet_messages.seq"


def upgrade() -> None:
    with op.batch_alter_table("fleet_messages") as batch:
        batch.alter_column("body", existing_type=sa.Text(), nullable=True)
    op.execute(
        "UPDATE fleet_messages SET body = NULL WHERE EXISTS "
        f"(SELECT 1 FROM fleet_windows w WHERE {_SAME_MESSAGE} AND w.body = fleet_messages.body)"
    )


def downgrade() -> None:
    op.execute(
        f"UPDATE fleet_messages SET body = (SELECT w.body FROM fleet_windows w WHERE {_SAME_MESSAGE}) "
        "WHERE body IS NULL"
    )
    with op.batch_alter_table("fleet_messages") as batch:
        batch.alter_column("body", existing_type=sa.Text(), nullable=False)
