"""The model catalog in SQL (SQLAlchemy 2.0 Core): models, versions, aliases.

The same schema runs on SQLite, PostgreSQL and MySQL/MariaDB, so it sticks to portable types:
bounded strings for keys, JSON for nested settings, naive UTC timestamps (MySQL drops the zone).
Table names carry a `registry_` prefix because the registry shares its database with AuthService.

Calls are synchronous; the servicer runs them with `asyncio.to_thread` (catalog calls are rare).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import SQLAlchemyError

from llmesh.common.config import ConfigError, ModelConfig
from llmesh.common.errors import DependencyDown
from llmesh.registry.v1 import registry_service_pb2 as registry_pb2

log = logging.getLogger(__name__)

NAME_LEN = 255

metadata = sa.MetaData()

models_table = sa.Table(
    "registry_models",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(NAME_LEN), nullable=False),
    sa.Column("version", sa.String(64), nullable=False),
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
    sa.UniqueConstraint("name", "version", name="uq_registry_models_name_version"),
)

aliases_table = sa.Table(
    "registry_model_aliases",
    metadata,
    sa.Column("alias", sa.String(NAME_LEN), primary_key=True),
    sa.Column("model_name", sa.String(NAME_LEN), nullable=False, index=True),
)


@dataclass(frozen=True)
class CatalogModel:
    """One catalog row (a model name at one version) with the aliases that point at its name."""

    name: str
    version: str
    description: str = ""
    owned_by: str = ""
    engine: dict[str, Any] = field(default_factory=dict)
    limits: dict[str, Any] = field(default_factory=dict)
    templates: tuple[dict[str, str], ...] = ()
    deploy: dict[str, Any] = field(default_factory=dict)
    cost_per_1k_tokens: float = 0.0
    status: int = registry_pb2.MODEL_STATUS_REGISTERED
    created_at: datetime = field(default_factory=lambda: datetime.fromtimestamp(0, UTC))
    aliases: tuple[str, ...] = ()


def _now() -> datetime:
    # Stored naive (UTC) so the value round-trips unchanged on MySQL, which has no zone type.
    return datetime.now(UTC).replace(tzinfo=None)


def _engine_settings(m: ModelConfig) -> dict[str, Any]:
    return {
        "engine": m.engine,
        "source": m.path,
        "dtype": m.dtype,
        "quantization": m.quantization,
        "max_model_len": m.max_model_len,
        "tensor_parallel_size": m.tensor_parallel_size,
        "max_num_seqs": m.max_num_seqs,
        "gpu_memory_utilization": m.gpu_memory_utilization,
        "trust_remote_code": m.trust_remote_code,
        "chat_template": m.chat_template,
        "upstream_model": m.upstream_model,
        # Not in the v1 message, kept so the catalog holds everything a worker loads the model with.
        "kv_cache_space_gb": m.kv_cache_space_gb,
        "enforce_eager": m.enforce_eager,
    }


def row_values_from_config(m: ModelConfig) -> dict[str, Any]:
    """The column values a config model is stored with (everything but ids and timestamps)."""
    return {
        "name": m.name,
        "version": m.version,
        "description": m.description,
        "owned_by": m.owned_by,
        "engine": _engine_settings(m),
        "limits": {"max_output_tokens": m.max_output_tokens},
        "templates": [dataclasses.asdict(t) for t in m.templates],
        "deploy": {},
        "cost_per_1k_tokens": m.cost_per_1k_tokens,
    }


def check_config_models(models: Sequence[ModelConfig]) -> None:
    """Reject config models whose names or aliases collide, before anything is written."""
    names = [m.name for m in models]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"models: duplicate model name(s) {dupes}; each name may appear once")
    seen: dict[str, str] = {}
    for m in models:
        if not m.name or len(m.name) > NAME_LEN:
            raise ConfigError(f"models: model name {m.name!r} must be 1..{NAME_LEN} characters")
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


class Catalog:
    """The model catalog: schema creation, config upserts, reads by name or alias."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    @classmethod
    def from_url(cls, url: str, *, echo: bool = False) -> Catalog:
        """A catalog on `url` (any SQLAlchemy URL: sqlite, postgresql+psycopg, mysql+pymysql)."""
        if not url:
            raise ConfigError("the registry needs a database URL (e.g. sqlite:///DATA_DIR/llmesh.db)")
        kwargs: dict[str, Any] = {"echo": echo, "pool_pre_ping": True}
        if url.startswith("mysql"):
            # MySQL closes idle connections after wait_timeout; recycle before that.
            kwargs["pool_recycle"] = 3600
        try:
            return cls(sa.create_engine(url, **kwargs))
        except (SQLAlchemyError, ImportError, ValueError) as e:
            raise ConfigError(f"database URL {masked_url(url)} is not usable: {e}") from None

    @property
    def url(self) -> str:
        """The database URL, password hidden."""
        return self._engine.url.render_as_string(hide_password=True)

    def create_schema(self) -> None:
        """Create the catalog tables if they do not exist (migrations come with Alembic later)."""
        try:
            metadata.create_all(self._engine)
        except SQLAlchemyError as e:
            raise DependencyDown(
                f"cannot reach the catalog database {self.url}: {e.__class__.__name__}: {e.args[0] if e.args else e}"
            ) from None

    def dispose(self) -> None:
        """Close pooled connections."""
        self._engine.dispose()

    def upsert_config_models(self, models: Sequence[ModelConfig]) -> None:
        """Write the config file's models: config is the source of truth for these names.

        Each (name, version) row is inserted or overwritten; other versions of the same name are
        retired; the name's aliases become exactly the configured ones (taking an alias over from
        another model if need be).
        """
        check_config_models(models)
        now = _now()
        with self._engine.begin() as conn:
            for m in models:
                values = row_values_from_config(m)
                existing = conn.execute(
                    sa.select(models_table.c.id, models_table.c.status).where(
                        models_table.c.name == m.name, models_table.c.version == m.version
                    )
                ).first()
                if existing is None:
                    conn.execute(
                        models_table.insert().values(
                            **values,
                            status=_status_name(registry_pb2.MODEL_STATUS_REGISTERED),
                            created_at=now,
                            updated_at=now,
                        )
                    )
                else:
                    status = existing.status
                    if status == _status_name(registry_pb2.MODEL_STATUS_RETIRED):
                        status = _status_name(registry_pb2.MODEL_STATUS_REGISTERED)
                    conn.execute(
                        models_table.update()
                        .where(models_table.c.id == existing.id)
                        .values(**values, status=status, updated_at=now)
                    )
                conn.execute(
                    models_table.update()
                    .where(models_table.c.name == m.name, models_table.c.version != m.version)
                    .values(status=_status_name(registry_pb2.MODEL_STATUS_RETIRED), updated_at=now)
                )
                conn.execute(
                    aliases_table.delete().where(
                        sa.or_(aliases_table.c.model_name == m.name, aliases_table.c.alias.in_(m.aliases))
                    )
                )
                if m.aliases:
                    conn.execute(
                        aliases_table.insert(), [{"alias": a, "model_name": m.name} for a in m.aliases]
                    )
        log.info("catalog: %d model(s) from the config upserted", len(models))

    def list_models(self, *, include_retired: bool = False) -> list[CatalogModel]:
        """Every model version, ordered by name then creation; retired ones only when asked."""
        query = sa.select(models_table).order_by(models_table.c.name, models_table.c.id)
        if not include_retired:
            query = query.where(models_table.c.status != _status_name(registry_pb2.MODEL_STATUS_RETIRED))
        with self._engine.connect() as conn:
            rows = conn.execute(query).all()
            aliases = self._aliases(conn, {r.name for r in rows})
        return [_to_model(r, aliases.get(r.name, ())) for r in rows]

    def get_model(self, name_or_alias: str) -> CatalogModel | None:
        """The newest live version of the model with this name, or the one the alias points at."""
        with self._engine.connect() as conn:
            name = name_or_alias
            row = self._newest(conn, name)
            if row is None:
                target = conn.execute(
                    sa.select(aliases_table.c.model_name).where(aliases_table.c.alias == name_or_alias)
                ).scalar()
                if target is None:
                    return None
                name = target
                row = self._newest(conn, name)
                if row is None:
                    return None
            aliases = self._aliases(conn, {name})
        return _to_model(row, aliases.get(name, ()))

    def resolve_names(self, names: Iterable[str]) -> tuple[dict[str, str], list[str]]:
        """Map names and aliases to live model names; also return the ones the catalog lacks."""
        wanted = list(dict.fromkeys(names))
        live = {m.name: m for m in self.list_models()}
        resolved: dict[str, str] = {}
        with self._engine.connect() as conn:
            alias_rows = conn.execute(
                sa.select(aliases_table.c.alias, aliases_table.c.model_name).where(
                    aliases_table.c.alias.in_(wanted)
                )
            ).all()
        by_alias = {a.alias: a.model_name for a in alias_rows}
        unknown = []
        for n in wanted:
            if n in live:
                resolved[n] = n
            elif by_alias.get(n) in live:
                resolved[n] = by_alias[n]
            else:
                unknown.append(n)
        return resolved, unknown

    def known_names(self) -> list[str]:
        """Live model names and their aliases, sorted (for "known: ..." messages)."""
        models = self.list_models()
        return sorted({m.name for m in models} | {a for m in models for a in m.aliases})

    @staticmethod
    def _newest(conn: sa.Connection, name: str) -> sa.Row[Any] | None:
        return conn.execute(
            sa.select(models_table)
            .where(
                models_table.c.name == name,
                models_table.c.status != _status_name(registry_pb2.MODEL_STATUS_RETIRED),
            )
            .order_by(models_table.c.id.desc())
            .limit(1)
        ).first()

    @staticmethod
    def _aliases(conn: sa.Connection, names: set[str]) -> dict[str, tuple[str, ...]]:
        if not names:
            return {}
        rows = conn.execute(
            sa.select(aliases_table.c.alias, aliases_table.c.model_name)
            .where(aliases_table.c.model_name.in_(sorted(names)))
            .order_by(aliases_table.c.alias)
        ).all()
        out: dict[str, list[str]] = {}
        for r in rows:
            out.setdefault(r.model_name, []).append(r.alias)
        return {k: tuple(v) for k, v in out.items()}


def _status_name(status: int) -> str:
    return registry_pb2.ModelStatus.Name(status)  # type: ignore[arg-type]


def _to_model(row: sa.Row[Any], aliases: tuple[str, ...]) -> CatalogModel:
    created = row.created_at
    if created.tzinfo is None:
        created = created.replace(tzinfo=UTC)
    try:
        status = registry_pb2.ModelStatus.Value(row.status)
    except ValueError:
        status = registry_pb2.MODEL_STATUS_UNSPECIFIED
    return CatalogModel(
        name=row.name,
        version=row.version,
        description=row.description or "",
        owned_by=row.owned_by or "",
        engine=dict(row.engine or {}),
        limits=dict(row.limits or {}),
        templates=tuple(dict(t) for t in (row.templates or ())),
        deploy=dict(row.deploy or {}),
        cost_per_1k_tokens=float(row.cost_per_1k_tokens or 0.0),
        status=status,
        created_at=created,
        aliases=aliases,
    )
