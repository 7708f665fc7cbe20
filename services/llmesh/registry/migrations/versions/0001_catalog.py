"""The first catalog: models and aliases (what `create_all` made before migrations existed).

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Databases created by `create_all` before migrations existed already have these tables:
    # adopt them as they are.
    existing = set(sa.inspect(op.get_bind()).get_table_names())
    if "registry_models" not in existing:
        op.create_table(
            "registry_models",
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("name", sa.String(255), nullable=False),
            sa.Column("version", sa.String(64), nullable=False),
            sa.Column("description", sa.Text, nullable=False),
            sa.Column("owned_by", sa.String(255), nullable=False),
            sa.Column("engine", sa.JSON, nullable=False),
            sa.Column("limits", sa.JSON, nullable=False),
            sa.Column("templates", sa.JSON, nullable=False),
            sa.Column("deploy", sa.JSON, nullable=False),
            sa.Column("cost_per_1k_tokens", sa.Float, nullable=False),
            sa.Column("status", sa.String(32), nullable=False),
            sa.Column("created_at", sa.DateTime, nullable=False),
            sa.Column("updated_at", sa.DateTime, nullable=False),
            sa.UniqueConstraint("name", "version", name="uq_registry_models_name_version"),
        )
    if "registry_model_aliases" not in existing:
        op.create_table(
            "registry_model_aliases",
            sa.Column("alias", sa.String(255), primary_key=True),
            sa.Column("model_name", sa.String(255), nullable=False),
        )
        op.create_index("ix_registry_model_aliases_model_name", "registry_model_aliases", ["model_name"])


def downgrade() -> None:
    op.drop_table("registry_model_aliases")
    op.drop_table("registry_models")
