"""The registry's Alembic history: fresh databases, databases made by `create_all` before
migrations existed, concurrent start-ups, and `llmesh db upgrade`."""

from __future__ import annotations

import threading
from datetime import datetime
from typing import Any

import pytest
import sqlalchemy as sa

from llmesh.cli.main import main as llmesh_main
from llmesh.common.errors import DependencyDown
from llmesh.common.migrations import current_revision, head_revision, upgrade
from llmesh.registry.catalog import Catalog
from llmesh.registry.schema import MIGRATIONS, VERSION_TABLE, metadata


def revision(url: str) -> str | None:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        at = current_revision(conn, VERSION_TABLE)
    engine.dispose()
    return at


def test_fresh_database_migrates_to_head_and_again_is_a_no_op(db_url: str) -> None:
    head = head_revision(MIGRATIONS)
    assert head == "0002"
    upgrade(db_url, MIGRATIONS, VERSION_TABLE)
    upgrade(db_url, MIGRATIONS, VERSION_TABLE)
    assert revision(db_url) == head
    engine = sa.create_engine(db_url)
    tables = set(sa.inspect(engine).get_table_names())
    engine.dispose()
    assert {t.name for t in metadata.sorted_tables} <= tables


def test_a_create_all_database_is_adopted_with_its_rows(db_url: str) -> None:
    # What the registry made before migrations existed: the 0001 tables, no version table.
    old = sa.MetaData()
    models = sa.Table(
        "registry_models",
        old,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("owned_by", sa.String(255), nullable=False),
        sa.Column("engine", sa.JSON, nullable=False),
        sa.Column("limits", sa.JSON, nullable=False),
        sa.Column("templates", sa.JSON, nullable=False),
        sa.Column("deploy", sa.JSON, nullable=False),
        sa.Column("cost_per_1k_tokens", sa.Float, nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("updated_at", sa.DateTime, nullable=False),
        sa.UniqueConstraint("name", "version", name="uq_registry_models_name_version"),
    )
    aliases = sa.Table(
        "registry_model_aliases",
        old,
        sa.Column("alias", sa.String(255), primary_key=True),
        sa.Column("model_name", sa.String(255), nullable=False, index=True),
    )
    engine = sa.create_engine(db_url)
    old.create_all(engine)
    now = datetime(2026, 1, 2, 3, 4, 5)
    with engine.begin() as conn:
        conn.execute(
            models.insert().values(
                name="legacy",
                version="v1",
                description="made before migrations",
                owned_by="ops",
                engine={"engine": "vllm", "source": "/models/legacy", "max_model_len": 4096},
                limits={"max_output_tokens": 512},
                templates=[],
                deploy={},
                cost_per_1k_tokens=0.1,
                status="MODEL_STATUS_READY",
                created_at=now,
                updated_at=now,
            )
        )
        conn.execute(aliases.insert().values(alias="old", model_name="legacy"))
    engine.dispose()

    catalog = Catalog.from_url(db_url)
    catalog.migrate()
    model = catalog.get_model("old")
    assert model is not None and model.name == "legacy" and model.engine["max_model_len"] == 4096
    assert (model.status_name, model.traffic_weight, model.labels, model.revision) == ("ready", 0, {}, 1)
    assert model.created_at.replace(tzinfo=None) == now
    catalog.dispose()
    assert revision(db_url) == "0002"


@pytest.mark.parametrize("kind", ["postgresql", "mysql"])
def test_replicas_starting_at_once_migrate_one_after_the_other(
    kind: str, request: pytest.FixtureRequest
) -> None:
    from tests.registry.conftest import drop_registry_tables

    url: str = request.getfixturevalue(f"{kind}_database")
    drop_registry_tables(url)
    errors: list[BaseException] = []

    def start() -> None:
        try:
            upgrade(url, MIGRATIONS, VERSION_TABLE)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert revision(url) == "0002"


def test_llmesh_db_upgrade(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path}/cli.db"
    assert llmesh_main(["db", "upgrade", "--database-url", url]) == 0
    out = capsys.readouterr().out
    assert "registry: at 0002, up to date" in out
    assert revision(url) == "0002"
    assert llmesh_main(["db", "current", "--database-url", url]) == 0
    assert "registry: at 0002, up to date" in capsys.readouterr().out

    assert (
        llmesh_main(["db", "upgrade", "--database-url", "postgresql+psycopg://postgres@127.0.0.1:1/x"]) == 1
    )
    assert "cannot migrate llmesh_registry_alembic_version on postgresql" in capsys.readouterr().err


def test_an_unreachable_database_is_dependency_down() -> None:
    with pytest.raises(
        DependencyDown, match=r"mysql\+pymysql://root@127.0.0.1:1/x.*check the database is up"
    ):
        upgrade("mysql+pymysql://root@127.0.0.1:1/x", MIGRATIONS, VERSION_TABLE)
