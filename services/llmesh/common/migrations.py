"""Alembic migrations run from code: every service that owns SQL tables upgrades them at start-up.

No alembic.ini: `upgrade()` builds Alembic's config in memory and hands the migration
environment an open connection plus the service's own version table (the registry and AuthService
share one database, so each keeps its own `*_alembic_version` table and revision history).

A service's migration package (e.g. `llmesh/registry/migrations/`) holds `versions/` and an
`env.py` of three lines:

    from llmesh.common.migrations import run_env
    run_env()

Calling `upgrade()` at every start-up is safe: it does nothing when the database is at head, and on
PostgreSQL and MySQL it holds a named database lock while it runs, so two replicas starting at once
upgrade one after the other instead of racing on the same DDL.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa
from alembic import command, context
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.exc import SQLAlchemyError

from llmesh.common.errors import DependencyDown

log = logging.getLogger(__name__)

# Seconds a replica waits for another one's migration before giving up (MySQL GET_LOCK).
LOCK_TIMEOUT_S = 120


def _config(script_location: str | Path, version_table: str, connection: sa.Connection) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(script_location))
    # Passed as attributes, not options: ConfigParser would choke on '%' in a password.
    cfg.attributes["connection"] = connection
    cfg.attributes["version_table"] = version_table
    return cfg


@contextmanager
def _migration_lock(conn: sa.Connection, version_table: str) -> Iterator[None]:
    """Serialise concurrent upgrades of one history on servers that have named locks."""
    dialect = conn.dialect.name
    if dialect == "postgresql":
        key = int.from_bytes(hashlib.sha256(version_table.encode()).digest()[:8], "big", signed=True)
        conn.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": key})
        conn.commit()
        try:
            yield
        finally:
            conn.rollback()
            conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
            conn.commit()
    elif dialect in ("mysql", "mariadb"):
        name = f"llmesh:{version_table}"[:64]
        got = conn.execute(sa.text("SELECT GET_LOCK(:n, :t)"), {"n": name, "t": LOCK_TIMEOUT_S}).scalar()
        conn.commit()
        if got != 1:
            raise DependencyDown(
                f"another process has been migrating {version_table} for over {LOCK_TIMEOUT_S}s; "
                "check for a stuck start-up and retry"
            )
        try:
            yield
        finally:
            conn.rollback()
            conn.execute(sa.text("SELECT RELEASE_LOCK(:n)"), {"n": name})
            conn.commit()
    else:
        # SQLite: one file on one host; its own write lock serialises writers.
        yield


def upgrade(database_url: str, script_location: str | Path, version_table: str) -> None:
    """Bring the tables of one migration history (`script_location`) up to head.

    Raises DependencyDown (UNAVAILABLE) naming the database when it cannot be reached or a
    migration fails on it; a missing migration directory is a bug and raises FileNotFoundError.
    """
    location = Path(script_location)
    if not (location / "env.py").is_file():
        raise FileNotFoundError(f"no Alembic environment (env.py) under {location}")
    engine = sa.create_engine(database_url, pool_pre_ping=True)
    shown = engine.url.render_as_string(hide_password=True)
    try:
        with engine.connect() as conn, _migration_lock(conn, version_table):
            before = current_revision(conn, version_table)
            command.upgrade(_config(location, version_table, conn), "head")
            conn.commit()
            after = current_revision(conn, version_table)
        if before != after:
            log.info(
                "database migrated",
                extra={"database": shown, "version_table": version_table, "from": before, "to": after},
            )
    except SQLAlchemyError as e:
        orig = getattr(e, "orig", None)
        first = (str(orig or e).splitlines() or [""])[0]
        raise DependencyDown(
            f"cannot migrate {version_table} on {shown}: {e.__class__.__name__}: {first}; "
            "check the database is up and the URL is right"
        ) from None
    finally:
        engine.dispose()


def current_revision(conn: sa.Connection, version_table: str) -> str | None:
    """The revision the database is at in one history (None before the first migration)."""
    return MigrationContext.configure(conn, opts={"version_table": version_table}).get_current_revision()


def head_revision(script_location: str | Path) -> str | None:
    """The newest revision a migration package has."""
    cfg = Config()
    cfg.set_main_option("script_location", str(script_location))
    return ScriptDirectory.from_config(cfg).get_current_head()


def run_env() -> None:
    """The body of every llmesh `env.py`: run the migrations on the connection `upgrade()` passed."""
    cfg = context.config
    connection = cfg.attributes.get("connection")
    if connection is None:
        raise RuntimeError(
            "llmesh migrations run through llmesh.common.migrations.upgrade() "
            "(or `llmesh db upgrade`), not the alembic command line"
        )
    context.configure(
        connection=connection,
        version_table=cfg.attributes["version_table"],
        # JSON/Text columns compare by type; keeps autogenerate (developers) quiet on SQLite.
        compare_type=True,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()
