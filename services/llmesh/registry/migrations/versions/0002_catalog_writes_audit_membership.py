"""Catalog writes: default sampling, labels, traffic weights, row revisions (etags); the audit
table; persisted worker membership.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable JSON: MySQL allows no literal default on JSON columns, and NULL reads as {}.
    with op.batch_alter_table("registry_models") as batch:
        batch.add_column(sa.Column("default_sampling", sa.JSON, nullable=True))
        batch.add_column(sa.Column("labels", sa.JSON, nullable=True))
        batch.add_column(sa.Column("traffic_weight", sa.Integer, nullable=False, server_default="0"))
        batch.add_column(sa.Column("revision", sa.Integer, nullable=False, server_default="1"))
    op.create_table(
        "registry_audit",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True
        ),
        sa.Column("at", sa.DateTime, nullable=False),
        sa.Column("actor", sa.String(255), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("model", sa.String(255), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("before", sa.Text, nullable=True),
        sa.Column("after", sa.Text, nullable=True),
    )
    op.create_index("ix_registry_audit_model", "registry_audit", ["model"])
    op.create_table(
        "registry_workers",
        sa.Column("worker_id", sa.String(255), primary_key=True),
        sa.Column("worker", sa.LargeBinary, nullable=False),
        sa.Column("admin_status", sa.String(32), nullable=False),
        sa.Column("updated_at", sa.DateTime, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("registry_workers")
    op.drop_index("ix_registry_audit_model", "registry_audit")
    op.drop_table("registry_audit")
    with op.batch_alter_table("registry_models") as batch:
        batch.drop_column("revision")
        batch.drop_column("traffic_weight")
        batch.drop_column("labels")
        batch.drop_column("default_sampling")
