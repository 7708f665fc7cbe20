"""The registry's SQL tables as they are at the newest migration (queries are written against these).

The tables themselves are created and changed only by the Alembic history in `migrations/`
(`llmesh db upgrade`, and every registry start-up). Table names carry a `registry_` prefix because
the registry shares its database with AuthService. Portable types only (SQLite, PostgreSQL,
MySQL/MariaDB): bounded strings for keys, JSON for nested settings, naive UTC timestamps.
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa

NAME_LEN = 255
VERSION_LEN = 64

MIGRATIONS = Path(__file__).parent / "migrations"
VERSION_TABLE = "llmesh_registry_alembic_version"

metadata = sa.MetaData()

models_table = sa.Table(
    "registry_models",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(NAME_LEN), nullable=False),
    sa.Column("version", sa.String(VERSION_LEN), nullable=False),
    sa.Column("description", sa.Text, nullable=False, default=""),
    sa.Column("owned_by", sa.String(NAME_LEN), nullable=False, default=""),
    sa.Column("engine", sa.JSON, nullable=False),
    sa.Column("limits", sa.JSON, nullable=False),
    sa.Column("templates", sa.JSON, nullable=False),
    sa.Column("deploy", sa.JSON, nullable=False),
    sa.Column("cost_per_1k_tokens", sa.Float, nullable=False, default=0.0),
    sa.Column("status", sa.String(32), nullable=False),
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.Column("updated_at", sa.DateTime, nullable=False),
    # 0002: defaults per model, labels, canary weight, and the row version behind etags.
    sa.Column("default_sampling", sa.JSON, nullable=True),
    sa.Column("labels", sa.JSON, nullable=True),
    sa.Column("traffic_weight", sa.Integer, nullable=False, default=0),
    sa.Column("revision", sa.Integer, nullable=False, default=1),
    sa.UniqueConstraint("name", "version", name="uq_registry_models_name_version"),
)

aliases_table = sa.Table(
    "registry_model_aliases",
    metadata,
    sa.Column("alias", sa.String(NAME_LEN), primary_key=True),
    sa.Column("model_name", sa.String(NAME_LEN), nullable=False, index=True),
)

audit_table = sa.Table(
    "registry_audit",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("at", sa.DateTime, nullable=False),
    sa.Column("actor", sa.String(NAME_LEN), nullable=False),
    sa.Column("action", sa.String(32), nullable=False),
    sa.Column("model", sa.String(NAME_LEN), nullable=False, index=True),
    sa.Column("version", sa.String(VERSION_LEN), nullable=False, default=""),
    sa.Column("before", sa.Text, nullable=True),
    sa.Column("after", sa.Text, nullable=True),
)

# Last known membership, written behind the in-memory table so a restarted registry serves it.
workers_table = sa.Table(
    "registry_workers",
    metadata,
    sa.Column("worker_id", sa.String(NAME_LEN), primary_key=True),
    sa.Column("worker", sa.LargeBinary, nullable=False),  # a serialized registry.v1.Worker
    sa.Column("admin_status", sa.String(32), nullable=False),
    sa.Column("updated_at", sa.DateTime, nullable=False),
)

ALL_TABLES = ("registry_models", "registry_model_aliases", "registry_audit", "registry_workers")
