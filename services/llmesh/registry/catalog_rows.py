"""Catalog rows as values, and the database-error mapping every catalog call goes through."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ParamSpec, TypeVar

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from llmesh.common.errors import Conflict, DependencyDown
from llmesh.registry.model_spec import DEPLOY_DEFAULTS, ENGINE_DEFAULTS, LIMITS_DEFAULTS, ModelSpec
from llmesh.registry.schema import aliases_table, models_table
from llmesh.registry.v1 import registry_service_pb2 as registry_pb2

P = ParamSpec("P")
R = TypeVar("R")

RETIRED = "MODEL_STATUS_RETIRED"


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
    default_sampling: dict[str, Any] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    traffic_weight: int = 0
    revision: int = 1
    updated_at: datetime = field(default_factory=lambda: datetime.fromtimestamp(0, UTC))
    row_id: int = 0

    @property
    def etag(self) -> str:
        """The opaque row version clients pass back to UpdateModel/DeleteModel."""
        return f'"{self.row_id}.{self.revision}"'

    @property
    def status_name(self) -> str:
        """The lifecycle status as YAML writes it ("ready")."""
        return status_key(self.status)

    def to_spec(self) -> ModelSpec:
        """The row's content as a spec (aliases included)."""
        return ModelSpec(
            name=self.name,
            version=self.version,
            description=self.description,
            owned_by=self.owned_by,
            status=self.status_name,
            engine={k: self.engine.get(k, d) for k, d in ENGINE_DEFAULTS.items()},
            limits={k: self.limits.get(k, d) for k, d in LIMITS_DEFAULTS.items()},
            default_sampling=dict(self.default_sampling),
            templates=tuple(dict(t) for t in self.templates),
            cost_per_1k_tokens=self.cost_per_1k_tokens,
            labels=dict(self.labels),
            deploy={k: self.deploy.get(k, d) for k, d in DEPLOY_DEFAULTS.items()},
            traffic_weight=self.traffic_weight,
            aliases=self.aliases,
        )


def status_key(status: int) -> str:
    """MODEL_STATUS_READY (enum number) -> "ready"."""
    return registry_pb2.ModelStatus.Name(status).removeprefix("MODEL_STATUS_").lower()  # type: ignore[arg-type]


def status_column(key: str) -> str:
    """ "ready" -> the stored "MODEL_STATUS_READY"."""
    return f"MODEL_STATUS_{key.upper()}"


def now_utc() -> datetime:
    """Now, naive UTC: stored that way so it round-trips unchanged on MySQL, which has no zone type."""
    return datetime.now(UTC).replace(tzinfo=None)


def db_call(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn database failures into domain errors: a lost race on a unique key is a Conflict,
    anything else (server down, connection reset, lock timeout) is DependencyDown."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except IntegrityError as e:
            raise Conflict(
                f"the catalog changed meanwhile ({_first_line(e)}); read it again and retry"
            ) from None
        except SQLAlchemyError as e:
            url = getattr(args[0], "url", "the catalog database") if args else "the catalog database"
            raise DependencyDown(
                f"cannot reach the catalog database {url}: {e.__class__.__name__}: {_first_line(e)}; "
                "retry when it is back"
            ) from None

    return wrapper


def _first_line(e: SQLAlchemyError) -> str:
    orig = getattr(e, "orig", None)
    return (str(orig or e).splitlines() or [""])[0]


def _aware(value: datetime | None) -> datetime:
    if value is None:
        return datetime.fromtimestamp(0, UTC)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def to_model(row: sa.Row[Any], aliases: tuple[str, ...]) -> CatalogModel:
    """A catalog row as a CatalogModel (rows written before 0002 read with defaults)."""
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
        created_at=_aware(row.created_at),
        aliases=aliases,
        default_sampling=dict(row.default_sampling or {}),
        labels=dict(row.labels or {}),
        traffic_weight=int(row.traffic_weight or 0),
        revision=int(row.revision or 1),
        updated_at=_aware(row.updated_at),
        row_id=int(row.id),
    )


def resolve_name(conn: sa.Connection, name_or_alias: str) -> str | None:
    """The model name `name_or_alias` stands for (any status), or None."""
    exists = conn.execute(
        sa.select(models_table.c.id).where(models_table.c.name == name_or_alias).limit(1)
    ).first()
    if exists is not None:
        return name_or_alias
    target: str | None = conn.execute(
        sa.select(aliases_table.c.model_name).where(aliases_table.c.alias == name_or_alias)
    ).scalar()
    return target


def select_row(conn: sa.Connection, name: str, version: str = "") -> sa.Row[Any] | None:
    """The row of that version (any status), or the newest live one when no version is given."""
    query = sa.select(models_table).where(models_table.c.name == name)
    if version:
        query = query.where(models_table.c.version == version)
    else:
        query = query.where(models_table.c.status != RETIRED).order_by(models_table.c.id.desc()).limit(1)
    return conn.execute(query).first()


def aliases_of(conn: sa.Connection, names: set[str]) -> dict[str, tuple[str, ...]]:
    """Aliases per model name, sorted."""
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
