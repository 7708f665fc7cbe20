"""The SQL engine AuthService's stores share, and the helpers every store uses."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from llmesh.common.config import ConfigError
from llmesh.common.errors import DependencyDown

T = TypeVar("T")


def make_engine(url: str, *, echo: bool = False) -> Engine:
    """A pooled engine on `url` (sqlite, postgresql+psycopg, mysql+pymysql)."""
    if not url:
        raise ConfigError("AuthService needs a database URL (e.g. sqlite:///DATA_DIR/llmesh.db)")
    kwargs: dict[str, Any] = {"echo": echo, "pool_pre_ping": True}
    if url.startswith("mysql"):
        # MySQL closes idle connections after wait_timeout; recycle before that.
        kwargs["pool_recycle"] = 3600
    if url.startswith("sqlite"):
        # Threads from asyncio.to_thread share the pool; wait on SQLite's write lock, not fail.
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
    try:
        return sa.create_engine(url, **kwargs)
    except (SQLAlchemyError, ImportError, ValueError) as e:
        raise ConfigError(f"database URL is not usable: {e}") from None


def utcnow() -> datetime:
    """Now, naive UTC: what the tables store (MySQL has no zone type)."""
    return datetime.now(UTC).replace(tzinfo=None)


def as_utc(value: datetime | None) -> datetime | None:
    """A stored naive timestamp as an aware UTC one."""
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def guarded(engine: Engine, work: Callable[[], T]) -> T:
    """Run `work`, turning a database failure into DependencyDown naming the database."""
    try:
        return work()
    except SQLAlchemyError as e:
        if isinstance(e, sa.exc.IntegrityError):
            raise
        first = str(getattr(e, "orig", None) or e).splitlines()[0]
        shown = engine.url.render_as_string(hide_password=True)
        raise DependencyDown(f"auth database {shown} failed: {e.__class__.__name__}: {first}") from None
