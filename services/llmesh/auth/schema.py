"""AuthService tables (SQLAlchemy Core). The Alembic history in `migrations/` creates them.

Portable across SQLite, PostgreSQL and MySQL/MariaDB: bounded strings for keys, naive UTC
timestamps (MySQL has no zone type), JSON for the model allow-list, days as 'YYYY-MM-DD' strings.
Every table is prefixed `auth_`: AuthService shares its database with the registry.
"""

from __future__ import annotations

import sqlalchemy as sa

ID_LEN = 32  # uuid4 hex
NAME_LEN = 255

metadata = sa.MetaData()


def _limit_columns() -> list[sa.Column[object]]:
    # The same limit columns on users and keys (0 or NULL: no limit at that level).
    return [
        sa.Column("rpm", sa.Integer, nullable=False, default=0),
        sa.Column("tpm", sa.Integer, nullable=False, default=0),
        sa.Column("budget_tokens", sa.BigInteger, nullable=False, default=0),
        sa.Column("budget_period", sa.String(16), nullable=False, default="none"),
        sa.Column("max_parallel", sa.Integer, nullable=False, default=0),
    ]


users = sa.Table(
    "auth_users",
    metadata,
    sa.Column("id", sa.String(ID_LEN), primary_key=True),
    sa.Column("username", sa.String(64), nullable=False, unique=True),
    sa.Column("password_hash", sa.String(NAME_LEN), nullable=False),
    sa.Column("role", sa.String(16), nullable=False),
    # NULL: unlimited credits.
    sa.Column("credits", sa.BigInteger, nullable=True),
    *_limit_columns(),
    sa.Column("tenant", sa.String(64), nullable=False, default=""),
    sa.Column("disabled", sa.Boolean, nullable=False, default=False),
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.Column("updated_at", sa.DateTime, nullable=False),
)

api_keys = sa.Table(
    "auth_api_keys",
    metadata,
    sa.Column("id", sa.String(ID_LEN), primary_key=True),
    sa.Column("user_id", sa.String(ID_LEN), sa.ForeignKey("auth_users.id"), nullable=False, index=True),
    sa.Column("name", sa.String(NAME_LEN), nullable=False, default=""),
    # The visible lookup prefix ("llm_" + 8 characters of the secret).
    sa.Column("prefix", sa.String(16), nullable=False, unique=True),
    # HMAC-SHA256(server secret, full key), hex.
    sa.Column("key_hash", sa.String(64), nullable=False),
    sa.Column("allowed_models", sa.JSON, nullable=False),
    *_limit_columns(),
    sa.Column("expires_at", sa.DateTime, nullable=True),
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.Column("last_used_at", sa.DateTime, nullable=True),
    sa.Column("revoked_at", sa.DateTime, nullable=True),
)

refresh_tokens = sa.Table(
    "auth_refresh_tokens",
    metadata,
    sa.Column("id", sa.String(ID_LEN), primary_key=True),
    # SHA-256 of the opaque token, hex (the token itself is never stored).
    sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("user_id", sa.String(ID_LEN), sa.ForeignKey("auth_users.id"), nullable=False, index=True),
    # Every token rotated from one login shares a family; reuse of a spent one revokes the family.
    sa.Column("family_id", sa.String(ID_LEN), nullable=False, index=True),
    sa.Column("expires_at", sa.DateTime, nullable=False),
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.Column("used_at", sa.DateTime, nullable=True),
    sa.Column("revoked_at", sa.DateTime, nullable=True),
)

signing_keys = sa.Table(
    "auth_signing_keys",
    metadata,
    sa.Column("kid", sa.String(64), primary_key=True),
    sa.Column("algorithm", sa.String(16), nullable=False),
    sa.Column("private_pem", sa.Text, nullable=False),
    sa.Column("public_jwk", sa.JSON, nullable=False),
    sa.Column("created_at", sa.DateTime, nullable=False),
    # Set when a newer key replaced it; it still verifies until retired_at + the access lifetime.
    sa.Column("retired_at", sa.DateTime, nullable=True),
)

secrets = sa.Table(
    "auth_secrets",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
    sa.Column("created_at", sa.DateTime, nullable=False),
)

usage = sa.Table(
    "auth_usage",
    metadata,
    # One row per request id: the primary key is what makes RecordUsage exactly-once.
    sa.Column("request_id", sa.String(64), primary_key=True),
    sa.Column("user_id", sa.String(ID_LEN), nullable=False),
    sa.Column("key_id", sa.String(ID_LEN), nullable=False, default=""),
    sa.Column("model", sa.String(NAME_LEN), nullable=False, default=""),
    sa.Column("day", sa.String(10), nullable=False),
    sa.Column("prompt_tokens", sa.Integer, nullable=False),
    sa.Column("completion_tokens", sa.Integer, nullable=False),
    sa.Column("credits", sa.BigInteger, nullable=False),
    sa.Column("outcome", sa.String(16), nullable=False),
    sa.Column("worker_id", sa.String(NAME_LEN), nullable=False, default=""),
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.Index("ix_auth_usage_user_day", "user_id", "day"),
    sa.Index("ix_auth_usage_key_day", "key_id", "day"),
)
