"""The model catalog in SQL (SQLAlchemy 2.0 Core): reads by name, alias and version.

Writes live in `catalog_writes.py` (the `CatalogWrites` base of `Catalog`); the tables in
`schema.py`, created and changed only by the Alembic history in `migrations/`.

Calls are synchronous; the servicer runs them with `asyncio.to_thread` (catalog calls are rare).
Every database failure surfaces as `DependencyDown` (UNAVAILABLE) naming the database, never as an
internal error: a caller can retry it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import SQLAlchemyError

from llmesh.common.config import ConfigError, ModelConfig
from llmesh.common.errors import DependencyDown, InvalidRequest
from llmesh.common.migrations import upgrade
from llmesh.registry.catalog_rows import (
    RETIRED,
    CatalogModel,
    aliases_of,
    db_call,
    resolve_name,
    select_row,
    to_model,
)
from llmesh.registry.catalog_writes import CatalogWrites
from llmesh.registry.model_spec import spec_from_config
from llmesh.registry.schema import (
    MIGRATIONS,
    NAME_LEN,
    VERSION_TABLE,
    aliases_table,
    metadata,
    models_table,
)

log = logging.getLogger(__name__)

__all__ = ["NAME_LEN", "Catalog", "CatalogModel", "check_config_models", "masked_url", "metadata"]


def check_config_models(models: Sequence[ModelConfig]) -> None:
    """Reject config models that are invalid or whose names or aliases collide, before any write."""
    names = [m.name for m in models]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"models: duplicate model name(s) {dupes}; each name may appear once")
    seen: dict[str, str] = {}
    for m in models:
        if not m.name or len(m.name) > NAME_LEN:
            raise ConfigError(f"models: model name {m.name!r} must be 1..{NAME_LEN} characters")
        try:
            spec_from_config(m)
        except InvalidRequest as e:
            raise ConfigError(e.message) from None
        for alias in m.aliases:
            if alias in names:
                raise ConfigError(f"models.{m.name}: alias {alias!r} is already the name of a model")
            if alias in seen and seen[alias] != m.name:
                raise ConfigError(f"models: alias {alias!r} is used by both {seen[alias]!r} and {m.name!r}")
            seen[alias] = m.name


def masked_url(url: str) -> str:
    """The database URL with any password hidden, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable database URL>"


class Catalog(CatalogWrites):
    """The model catalog: migrations, reads by name/alias/version, and (via CatalogWrites) changes."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        # The last names and aliases read, so workers can still register while the database is down.
        self._names_cache: tuple[set[str], dict[str, str]] | None = None

    @classmethod
    def from_url(cls, url: str, *, echo: bool = False) -> Catalog:
        """A catalog on `url` (any SQLAlchemy URL: sqlite, postgresql+psycopg, mysql+pymysql)."""
        if not url:
            raise ConfigError("the registry needs a database URL (e.g. sqlite:///DATA_DIR/llmesh.db)")
        kwargs: dict[str, Any] = {"echo": echo, "pool_pre_ping": True}
        if url.startswith("mysql"):
            # MySQL closes idle connections after wait_timeout; recycle before that.
            kwargs["pool_recycle"] = 3600
        if url.startswith(("postgresql", "mysql")):
            # Fail fast while the server is down instead of hanging an RPC for the OS timeout.
            kwargs["connect_args"] = {"connect_timeout": 3}
            kwargs["pool_timeout"] = 5
        try:
            return cls(sa.create_engine(url, **kwargs))
        except (SQLAlchemyError, ImportError, ValueError) as e:
            raise ConfigError(f"database URL {masked_url(url)} is not usable: {e}") from None

    @property
    def url(self) -> str:
        """The database URL, password hidden."""
        return self._engine.url.render_as_string(hide_password=True)

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine (membership persistence shares it)."""
        return self._engine

    def migrate(self) -> None:
        """Apply the registry's migrations up to head (idempotent; DependencyDown when down)."""
        upgrade(self._engine.url.render_as_string(hide_password=False), MIGRATIONS, VERSION_TABLE)

    create_schema = migrate  # the name callers used before migrations existed

    def dispose(self) -> None:
        """Close pooled connections."""
        self._engine.dispose()

    def upsert_config_models(self, models: Sequence[ModelConfig], *, actor: str = "config") -> None:
        """Write the config file's models: config is the source of truth for the rows it lists.

        Each (name, version) row is inserted, or overwritten when it differs (unchanged rows are
        not touched); the name's aliases become exactly the configured ones. Other versions of the
        same name (canaries created by API) are left alone.
        """
        check_config_models(models)
        specs = [spec_from_config(m) for m in models]
        self.import_specs(specs, replace=False, actor=actor, where="models")
        log.info("catalog: %d model(s) from the config upserted", len(models))

    @db_call
    def list_models(self, *, include_retired: bool = False) -> list[CatalogModel]:
        """Every model version, ordered by name then creation; retired ones only when asked."""
        query = sa.select(models_table).order_by(models_table.c.name, models_table.c.id)
        if not include_retired:
            query = query.where(models_table.c.status != RETIRED)
        with self._engine.connect() as conn:
            rows = conn.execute(query).all()
            aliases = aliases_of(conn, {r.name for r in rows})
        return [to_model(r, aliases.get(r.name, ())) for r in rows]

    @db_call
    def get_model(self, name_or_alias: str, version: str = "") -> CatalogModel | None:
        """The version asked for (any status), else the newest live version of the model with this
        name, or of the one the alias points at."""
        with self._engine.connect() as conn:
            name = resolve_name(conn, name_or_alias)
            if name is None:
                return None
            row = select_row(conn, name, version)
            if row is None:
                return None
            aliases = aliases_of(conn, {name})
        return to_model(row, aliases.get(name, ()))

    @db_call
    def versions(self, name: str) -> list[CatalogModel]:
        """Every version of one model name (retired included), oldest first."""
        with self._engine.connect() as conn:
            rows = conn.execute(
                sa.select(models_table).where(models_table.c.name == name).order_by(models_table.c.id)
            ).all()
            aliases = aliases_of(conn, {name})
        return [to_model(r, aliases.get(name, ())) for r in rows]

    def resolve_names(self, names: Iterable[str]) -> tuple[dict[str, str], list[str]]:
        """Map names and aliases to live model names; also return the ones the catalog lacks.

        While the database is down the last names read are used (logged), so registrations keep
        working through an outage; with nothing read yet, DependencyDown.
        """
        wanted = list(dict.fromkeys(names))
        try:
            live, by_alias = self._live_names()
        except DependencyDown:
            if self._names_cache is None:
                raise
            log.warning("catalog database unreachable; resolving model names from the last known catalog")
            live, by_alias = self._names_cache
        resolved: dict[str, str] = {}
        unknown = []
        for n in wanted:
            if n in live:
                resolved[n] = n
            elif by_alias.get(n) in live:
                resolved[n] = by_alias[n]
            else:
                unknown.append(n)
        return resolved, unknown

    @db_call
    def _live_names(self) -> tuple[set[str], dict[str, str]]:
        with self._engine.connect() as conn:
            live = set(
                conn.execute(
                    sa.select(models_table.c.name).where(models_table.c.status != RETIRED).distinct()
                )
                .scalars()
                .all()
            )
            by_alias = {a.alias: a.model_name for a in conn.execute(sa.select(aliases_table)).all()}
        self._names_cache = (live, by_alias)
        return live, by_alias

    def known_names(self) -> list[str]:
        """Live model names and their aliases, sorted (for "known: ..." messages)."""
        try:
            live, by_alias = self._live_names()
        except DependencyDown:
            live, by_alias = self._names_cache or (set(), {})
        return sorted(live | {a for a, m in by_alias.items() if m in live})
