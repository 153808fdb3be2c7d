"""fleet_error_buckets: the fleet error-rate rule's running sums per (model, version, bucket)

The rule summed requests and errors over every summary window of a (model, version, bucket) in
fleet_windows, once per bucket and batch: 10,000 rows with 10,000 devices, about 12 % of the
writer's time, growing with the fleet. The store now keeps each bucket's count and sums in this
table (hub.fleet.buckets), in the transaction that inserts or expires the windows, and the rule
reads one row. Upgrade: the table, filled from fleet_windows for the default bucket size (300 s;
a hub configured with another fills its own on its first write). Downgrade: the table is dropped.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27 18:20:00
"""

from __future__ import annotations

import math

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None

DEFAULT_WINDOW_S = 300.0  # hub.fleet.alerts.DEFAULT_ERROR_WINDOW_S when this revision was written


def upgrade() -> None:
    buckets = op.create_table(
        "fleet_error_buckets",
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("window_s", sa.Float(), nullable=False),
        sa.Column("bucket", sa.Float(), nullable=False),
        sa.Column("windows", sa.BigInteger(), nullable=False),
        sa.Column("requests", sa.BigInteger(), nullable=False),
        sa.Column("errors", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("model", "version", "window_s", "bucket"),
    )
    # Grouped by window end in SQL (a fleet's windows share few ends), by bucket here: floor()
    # is not in every SQLite. The bucket is hub.fleet.alerts.error_bucket's.
    rows = op.get_bind().execute(
        sa.text(
            "SELECT model, version, window_end, count(*), sum(requests), sum(errors) FROM fleet_windows "
            "WHERE kind = 'summary' GROUP BY model, version, window_end"
        )
    )
    sums: dict[tuple[str, int, float], list[int]] = {}
    for model, version, end, windows, requests, errors in rows:
        key = (model, int(version), math.floor(end / DEFAULT_WINDOW_S) * DEFAULT_WINDOW_S)
        total = sums.setdefault(key, [0, 0, 0])
        total[0] += int(windows)
        total[1] += int(requests or 0)
        total[2] += int(errors or 0)
    if sums:
        op.bulk_insert(
            buckets,
            [
                {"model": m, "version": v, "window_s": DEFAULT_WINDOW_S, "bucket": b,
                 "windows": n, "requests": r, "errors": e}
                for (m, v, b), (n, r, e) in sorted(sums.items())
            ],
        )  # fmt: skip


def downgrade() -> None:
    op.drop_table("fleet_error_buckets")
