"""`llmesh db`: apply or inspect the SQL migrations of every service that owns tables.

The registry and AuthService share one database, each with its own Alembic history and version
table; services also migrate at start-up, so this is for operators who upgrade ahead of a rollout
(or check where a database stands).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

from llmesh.common.config import LlmeshConfig
from llmesh.common.errors import DependencyDown
from llmesh.common.migrations import current_revision, head_revision, upgrade


@dataclass(frozen=True)
class History:
    """One service's migration history."""

    service: str
    script_location: Path
    version_table: str


def histories() -> list[History]:
    """The registry's history, and AuthService's where that package ships migrations."""
    from llmesh.registry.schema import MIGRATIONS, VERSION_TABLE

    found = [History("registry", MIGRATIONS, VERSION_TABLE)]
    spec = importlib.util.find_spec("llmesh.auth")
    if spec is not None and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            location = Path(root) / "migrations"
            if (location / "env.py").is_file():
                found.append(History("auth", location, _auth_version_table()))
                break
    return found


def _auth_version_table() -> str:
    try:
        from llmesh.auth.migrate import VERSION_TABLE

        return str(VERSION_TABLE)
    except ImportError:
        return "llmesh_auth_alembic_version"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="db_command", required=True, metavar="SUBCOMMAND")
    for name, help_text in (
        ("upgrade", "apply every pending migration (registry, then auth); safe to repeat"),
        ("current", "show the revision each history is at, and its head"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--database-url", help="SQLAlchemy URL (default: database.url, else the SQLite file)")
        p.add_argument("--data-dir", type=Path, default=Path(".llmesh"), help="where the SQLite file lives")


def db_main(args: argparse.Namespace, cfg: LlmeshConfig) -> int:
    from llmesh.cli.serve import database_url

    url = args.database_url or database_url(cfg, args.data_dir)
    try:
        for history in histories():
            if args.db_command == "upgrade":
                upgrade(url, history.script_location, history.version_table)
            engine = sa.create_engine(url)
            try:
                with engine.connect() as conn:
                    at = current_revision(conn, history.version_table)
            finally:
                engine.dispose()
            head = head_revision(history.script_location)
            state = "up to date" if at == head else f"behind (head {head}; run `llmesh db upgrade`)"
            print(f"{history.service}: at {at or 'nothing'}, {state}")
    except DependencyDown as e:
        print(f"llmesh db: {e.message}", file=sys.stderr)
        return 1
    except sa.exc.SQLAlchemyError as e:
        print(f"llmesh db: cannot reach the database: {e.__class__.__name__}: {e}", file=sys.stderr)
        return 1
    return 0
