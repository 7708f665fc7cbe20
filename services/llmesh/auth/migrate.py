"""Run AuthService's Alembic history (its own version table in the shared database)."""

from __future__ import annotations

from pathlib import Path

from llmesh.common.migrations import upgrade as upgrade_history

MIGRATIONS = Path(__file__).parent / "migrations"
VERSION_TABLE = "llmesh_auth_alembic_version"


def upgrade(database_url: str) -> None:
    """Bring the auth_* tables to head; a no-op when they already are."""
    upgrade_history(database_url, MIGRATIONS, VERSION_TABLE)
