"""Alembic's entry point for the hub: migrations run on the connection hub.migrations hands over
(inside its transaction), against the metadata of every hub table."""

from __future__ import annotations

from typing import Any, Literal

from alembic import context
from alembic.autogenerate.api import AutogenContext

from hub.migrations import VERSION_TABLE, metadata
from hub.registry.db import UTCDateTime


def render_item(kind: str, obj: Any, autogen: AutogenContext) -> str | Literal[False]:
    """Revisions name plain SQLAlchemy types, never the hub's own (which may change later)."""
    if kind == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime()"
    return False


def run() -> None:
    connection = context.config.attributes.get("connection")
    if connection is None or context.is_offline_mode():
        raise RuntimeError(
            "run the hub's migrations through hub.migrations (outpost-hub migrate, or "
            "python -m hub.migrations), which hands them a connection"
        )
    context.configure(
        connection=connection,
        target_metadata=metadata(),
        version_table=VERSION_TABLE,
        render_as_batch=True,  # SQLite cannot ALTER most things: copy-and-rename batches
        compare_type=True,
        render_item=render_item,
    )
    with context.begin_transaction():
        context.run_migrations()


run()
