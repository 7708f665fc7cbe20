"""AuthService's Alembic history: creates exactly the tables the code uses, in its own version table."""

from __future__ import annotations

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from llmesh.auth.migrate import MIGRATIONS, VERSION_TABLE, upgrade
from llmesh.auth.schema import metadata
from llmesh.common.migrations import current_revision, head_revision


def test_migrations_match_the_schema_and_are_idempotent(db_url: str) -> None:
    upgrade(db_url)
    upgrade(db_url)  # a second start changes nothing
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            assert current_revision(conn, VERSION_TABLE) == head_revision(MIGRATIONS)
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            diff = [
                d
                for d in compare_metadata(context, metadata)
                # Other services' tables (the registry's) share the database.
                if not (d[0] == "remove_table" and not d[1].name.startswith("auth_"))
            ]
            assert diff == []
            tables = set(sa.inspect(conn).get_table_names())
        assert {t for t in tables if t.startswith("auth_")} == set(metadata.tables)
        assert VERSION_TABLE in tables and "alembic_version" not in tables
    finally:
        engine.dispose()
