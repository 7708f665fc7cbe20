"""Catalog changes: create, update (optimistic concurrency), retire, aliases, traffic weights,
import/export of the models YAML, and the audit table every change is written to.

Each write is one transaction. An update only lands on the row revision it was computed from
(`UPDATE ... WHERE revision = :read`), so of two admins who read the same etag, one wins and the
other gets `Aborted` instead of silently overwriting.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from llmesh.common.errors import Aborted, Conflict, InvalidRequest, NotFound
from llmesh.registry.catalog_rows import (
    RETIRED,
    CatalogModel,
    aliases_of,
    db_call,
    now_utc,
    resolve_name,
    select_row,
    status_column,
    to_model,
)
from llmesh.registry.model_spec import ModelSpec, check_step, to_export_mapping
from llmesh.registry.models_yaml import dump_models_yaml, parse_models_yaml

__all__ = ["CatalogWrites", "ImportResult", "parse_models_yaml"]
from llmesh.registry.schema import aliases_table, audit_table, models_table

MAX_WEIGHT = 1_000_000


@dataclass
class ImportResult:
    """What an import did, row by row ("name@version")."""

    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    retired: list[str] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        """Model names the import touched or confirmed, in file order."""
        keys = [*self.created, *self.updated, *self.unchanged]
        return list(dict.fromkeys(k.split("@", 1)[0] for k in keys))


def _dump(value: Any) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True, separators=(",", ":"))


def _row_values(spec: ModelSpec, status: str, weight: int) -> dict[str, Any]:
    return {
        "name": spec.name,
        "version": spec.version,
        "description": spec.description,
        "owned_by": spec.owned_by,
        "engine": spec.engine,
        "limits": spec.limits,
        "templates": [dict(t) for t in spec.templates],
        "deploy": spec.deploy,
        "cost_per_1k_tokens": spec.cost_per_1k_tokens,
        "status": status_column(status),
        "default_sampling": spec.default_sampling,
        "labels": spec.labels,
        "traffic_weight": weight,
    }


def _audited(model: CatalogModel | None) -> dict[str, Any] | None:
    if model is None:
        return None
    return {**model.to_spec().content(), "aliases": list(model.aliases), "revision": model.revision}


class CatalogWrites:
    """The write half of `Catalog` (which provides the engine and the URL)."""

    _engine: Engine

    @property
    def url(self) -> str:
        """The database URL, password hidden (Catalog overrides)."""
        return self._engine.url.render_as_string(hide_password=True)

    # ---- single rows ------------------------------------------------------------------------

    @db_call
    def create_model(self, spec: ModelSpec, *, actor: str, where: str = "model") -> CatalogModel:
        """Insert a new (name, version); ALREADY_EXISTS when it exists (retired rows included)."""
        with self._engine.begin() as conn:
            existing = select_row(conn, spec.name, spec.version)
            if existing is not None:
                hint = (
                    "it is retired: ImportModels it again to bring it back"
                    if existing.status == RETIRED
                    else "UpdateModel changes it"
                )
                raise Conflict(f"{where}.version: {spec.key} already exists; {hint}")
            self._check_not_alias(conn, spec.name, f"{where}.name")
            model = self._insert(conn, spec, actor=actor, action="create", where=where, take_over=False)
        return model

    @db_call
    def update_model(
        self, current: CatalogModel, new: ModelSpec, *, actor: str, where: str = "model"
    ) -> CatalogModel:
        """Write `new` over the row `current` was read from, only if nobody changed it since."""
        with self._engine.begin() as conn:
            return self._update(
                conn, current, new, actor=actor, action="update", where=where, take_over=False
            )

    @db_call
    def delete_model(self, name: str, version: str, etag: str, *, actor: str) -> list[CatalogModel]:
        """Retire one version (or every live one); aliases go when no live version is left."""
        if etag and not version:
            raise InvalidRequest("etag: an etag belongs to one version; set version too")
        with self._engine.begin() as conn:
            target = resolve_name(conn, name)
            if target is None:
                raise NotFound(f"name: model {name!r} not found (see ListModels)")
            if target != name:
                raise InvalidRequest(f"name: {name!r} is an alias of {target!r}; delete by the model name")
            query = sa.select(models_table).where(models_table.c.name == name)
            query = query.where(
                models_table.c.version == version if version else models_table.c.status != RETIRED
            )
            rows = conn.execute(query.order_by(models_table.c.id)).all()
            if version and not rows:
                raise NotFound(f"version: model {name!r} has no version {version!r}")
            aliases = aliases_of(conn, {name}).get(name, ())
            current = [to_model(r, aliases) for r in rows if r.status != RETIRED]
            for m in current:
                if etag and etag != m.etag:
                    raise Aborted(
                        f"etag: {m.name}@{m.version} changed since etag {etag} (now {m.etag}); read it again"
                    )
                check_step(m.status_name, "retired", f"{m.name}@{m.version} status")
            retired = []
            for m in current:
                gone = replace(m.to_spec(), status="retired", traffic_weight=0)
                retired.append(self._update(conn, m, gone, actor=actor, action="delete", where="name"))
            live_left = conn.execute(
                sa.select(models_table.c.id).where(
                    models_table.c.name == name, models_table.c.status != RETIRED
                )
            ).first()
            if live_left is None and aliases:
                conn.execute(aliases_table.delete().where(aliases_table.c.model_name == name))
                self._audit(conn, actor, "set_alias", name, "", {"aliases": list(aliases)}, {"aliases": []})
        return retired

    # ---- aliases and traffic ----------------------------------------------------------------

    @db_call
    def set_alias(self, alias: str, model: str, *, actor: str) -> str:
        """Point `alias` at model name `model` (empty removes it); returns the target."""
        with self._engine.begin() as conn:
            if conn.execute(
                sa.select(models_table.c.id).where(models_table.c.name == alias).limit(1)
            ).first():
                raise InvalidRequest(f"alias: {alias!r} is the name of a model; an alias must not shadow one")
            before = conn.execute(
                sa.select(aliases_table.c.model_name).where(aliases_table.c.alias == alias)
            ).scalar()
            if model:
                live = conn.execute(
                    sa.select(models_table.c.id)
                    .where(models_table.c.name == model, models_table.c.status != RETIRED)
                    .limit(1)
                ).first()
                if live is None:
                    owner = conn.execute(
                        sa.select(aliases_table.c.model_name).where(aliases_table.c.alias == model)
                    ).scalar()
                    hint = f"{model!r} is itself an alias of {owner!r}" if owner else "see ListModels"
                    raise NotFound(f"model: no live model named {model!r} ({hint})")
            if before == (model or None):
                return model
            conn.execute(aliases_table.delete().where(aliases_table.c.alias == alias))
            if model:
                conn.execute(aliases_table.insert().values(alias=alias, model_name=model))
            self._audit(
                conn, actor, "set_alias", model or before or "", "", {"alias": alias, "model": before},
                {"alias": alias, "model": model or None},
            )  # fmt: skip
        return model

    @db_call
    def set_traffic_weights(
        self, name: str, weights: dict[str, int], *, actor: str
    ) -> tuple[str, dict[str, int]]:
        """Split a model's traffic between its live versions (empty clears the split).

        Returns the model name and the weights in force (versions with weight > 0).
        """
        with self._engine.begin() as conn:
            target = resolve_name(conn, name)
            rows: list[Any] = []
            if target is not None:
                rows = list(
                    conn.execute(
                        sa.select(models_table)
                        .where(models_table.c.name == target, models_table.c.status != RETIRED)
                        .order_by(models_table.c.id)
                    ).all()
                )
            if not rows or target is None:
                raise NotFound(f"name: no live model {name!r} (see ListModels)")
            live = {r.version: r for r in rows}
            for version, weight in sorted(weights.items()):
                if version not in live:
                    raise InvalidRequest(
                        f"weights[{version!r}]: model {target!r} has no live version {version!r}; "
                        f"live versions: {sorted(live)}"
                    )
                if not 0 <= weight <= MAX_WEIGHT:
                    raise InvalidRequest(
                        f"weights[{version!r}] is {weight}; weights go from 0 to {MAX_WEIGHT}"
                    )
            if weights and not any(weights.values()):
                raise InvalidRequest(
                    "weights: at least one version needs a weight above 0 (an empty map clears the split)"
                )
            before = {r.version: int(r.traffic_weight) for r in rows if r.traffic_weight}
            now = now_utc()
            for r in rows:
                new = int(weights.get(r.version, 0))
                if new != r.traffic_weight:
                    conn.execute(
                        models_table.update()
                        .where(models_table.c.id == r.id)
                        .values(traffic_weight=new, revision=models_table.c.revision + 1, updated_at=now)
                    )
            after = {v: w for v, w in sorted(weights.items()) if w}
            if before != after:
                self._audit(conn, actor, "set_traffic", target, "", {"weights": before}, {"weights": after})
        return target, after

    @db_call
    def traffic_splits(self) -> dict[str, dict[str, int]]:
        """Every split in force: model name -> {version: weight} (only weights above 0)."""
        with self._engine.connect() as conn:
            rows = conn.execute(
                sa.select(models_table.c.name, models_table.c.version, models_table.c.traffic_weight)
                .where(models_table.c.status != RETIRED, models_table.c.traffic_weight > 0)
                .order_by(models_table.c.name, models_table.c.version)
            ).all()
        out: dict[str, dict[str, int]] = {}
        for r in rows:
            out.setdefault(r.name, {})[r.version] = int(r.traffic_weight)
        return out

    # ---- import / export --------------------------------------------------------------------

    @db_call
    def import_specs(
        self, specs: Sequence[ModelSpec], *, replace: bool, actor: str, where: str = "models"
    ) -> ImportResult:
        """Upsert rows idempotently in one transaction: unchanged rows are not written at all.

        Listed aliases become the name's aliases exactly (taking them over from other models:
        the file is the source of truth); `replace` also retires the listed names' other versions.
        """
        result = ImportResult()
        with self._engine.begin() as conn:
            listed: dict[str, set[str]] = {}
            for i, spec in enumerate(specs):
                at = f"{where}[{i}]"
                listed.setdefault(spec.name, set()).add(spec.version)
                row = select_row(conn, spec.name, spec.version)
                if row is None:
                    self._check_not_alias(conn, spec.name, f"{at}.name")
                    self._insert(conn, spec, actor=actor, action="import", where=at, take_over=True)
                    result.created.append(spec.key)
                    continue
                current = to_model(row, aliases_of(conn, {spec.name}).get(spec.name, ()))
                merged = _merge_unset(spec, current)
                if merged.content() == current.to_spec().content() and merged.aliases == current.aliases:
                    result.unchanged.append(spec.key)
                    continue
                self._update(conn, current, merged, actor=actor, action="import", where=at, take_over=True)
                result.updated.append(spec.key)
            if replace:
                for name, versions in listed.items():
                    for row in conn.execute(
                        sa.select(models_table).where(
                            models_table.c.name == name,
                            models_table.c.status != RETIRED,
                            models_table.c.version.not_in(sorted(versions)),
                        )
                    ).all():
                        current = to_model(row, aliases_of(conn, {name}).get(name, ()))
                        check_step(current.status_name, "retired", f"{name}@{current.version} status")
                        gone = replace_spec(current.to_spec(), status="retired", traffic_weight=0)
                        self._update(conn, current, gone, actor=actor, action="import", where=where)
                        result.retired.append(f"{name}@{current.version}")
        return result

    @db_call
    def export_yaml(self, *, include_retired: bool = False) -> str:
        """The catalog as a models YAML: canonical, so export → import → export is byte-stable."""
        query = sa.select(models_table).order_by(models_table.c.name, models_table.c.id)
        if not include_retired:
            query = query.where(models_table.c.status != RETIRED)
        with self._engine.connect() as conn:
            rows = conn.execute(query).all()
            aliases = aliases_of(conn, {r.name for r in rows})
        entries = [to_export_mapping(to_model(r, ()).to_spec(), aliases.get(r.name, ())) for r in rows]
        return dump_models_yaml(entries)

    @db_call
    def audit_events(self, model: str = "", limit: int = 100) -> list[sa.Row[Any]]:
        """Audit rows, newest first."""
        query = sa.select(audit_table).order_by(audit_table.c.id.desc()).limit(limit)
        if model:
            query = query.where(audit_table.c.model == model)
        with self._engine.connect() as conn:
            return list(conn.execute(query).all())

    # ---- internals --------------------------------------------------------------------------

    def _insert(
        self, conn: sa.Connection, spec: ModelSpec, *, actor: str, action: str, where: str, take_over: bool
    ) -> CatalogModel:
        now = now_utc()
        values = _row_values(spec, spec.status or "registered", spec.traffic_weight or 0)
        conn.execute(models_table.insert().values(**values, revision=1, created_at=now, updated_at=now))
        if spec.aliases is not None:
            self._write_aliases(conn, spec.name, spec.aliases, f"{where}.aliases", take_over, actor)
        row = select_row(conn, spec.name, spec.version)
        assert row is not None
        model = to_model(row, aliases_of(conn, {spec.name}).get(spec.name, ()))
        self._audit(conn, actor, action, spec.name, spec.version, None, _audited(model))
        return model

    def _update(
        self,
        conn: sa.Connection,
        current: CatalogModel,
        new: ModelSpec,
        *,
        actor: str,
        action: str,
        where: str,
        take_over: bool = False,
    ) -> CatalogModel:
        status = new.status or current.status_name
        check_step(current.status_name, status, f"{where}.status")
        weight = current.traffic_weight if new.traffic_weight is None else new.traffic_weight
        result = conn.execute(
            models_table.update()
            .where(models_table.c.id == current.row_id, models_table.c.revision == current.revision)
            .values(**_row_values(new, status, weight), revision=current.revision + 1, updated_at=now_utc())
        )
        if result.rowcount != 1:
            raise Aborted(
                f"{where}: {current.name}@{current.version} was changed by someone else since etag "
                f"{current.etag}; read it again (GetModel), re-apply the change and retry"
            )
        if new.aliases is not None and new.aliases != current.aliases:
            self._write_aliases(conn, new.name, new.aliases, f"{where}.aliases", take_over, actor)
        row = select_row(conn, current.name, current.version)
        assert row is not None
        model = to_model(row, aliases_of(conn, {current.name}).get(current.name, ()))
        self._audit(conn, actor, action, current.name, current.version, _audited(current), _audited(model))
        return model

    def _write_aliases(
        self,
        conn: sa.Connection,
        name: str,
        aliases: tuple[str, ...],
        where: str,
        take_over: bool,
        actor: str,
    ) -> None:
        for i, alias in enumerate(aliases):
            if conn.execute(
                sa.select(models_table.c.id).where(models_table.c.name == alias).limit(1)
            ).first():
                raise InvalidRequest(
                    f"{where}[{i}]: {alias!r} is the name of a model; an alias must not shadow one"
                )
            owner = conn.execute(
                sa.select(aliases_table.c.model_name).where(aliases_table.c.alias == alias)
            ).scalar()
            if owner is not None and owner != name:
                if not take_over:
                    raise Conflict(
                        f"{where}[{i}]: alias {alias!r} already points at {owner!r}; SetAlias moves it"
                    )
                self._audit(
                    conn, actor, "set_alias", owner, "", {"alias": alias, "model": owner}, {"alias": alias, "model": name}
                )  # fmt: skip
        conn.execute(
            aliases_table.delete().where(
                sa.or_(aliases_table.c.model_name == name, aliases_table.c.alias.in_(list(aliases)))
            )
        )
        if aliases:
            conn.execute(aliases_table.insert(), [{"alias": a, "model_name": name} for a in aliases])

    @staticmethod
    def _check_not_alias(conn: sa.Connection, name: str, where: str) -> None:
        owner = conn.execute(
            sa.select(aliases_table.c.model_name).where(aliases_table.c.alias == name)
        ).scalar()
        if owner is not None:
            raise InvalidRequest(f"{where} {name!r} is already an alias of {owner!r}; pick another name")

    @staticmethod
    def _audit(
        conn: sa.Connection,
        actor: str,
        action: str,
        model: str,
        version: str,
        before: dict[str, Any] | None,
        after: dict[str, Any] | None,
    ) -> None:
        conn.execute(
            audit_table.insert().values(
                at=now_utc(),
                actor=(actor or "unknown")[:255],
                action=action,
                model=model,
                version=version,
                before=_dump(before),
                after=_dump(after),
            )
        )


def replace_spec(spec: ModelSpec, **changes: Any) -> ModelSpec:
    """A copy of `spec` with some fields changed."""
    return replace(spec, **changes)


def _merge_unset(spec: ModelSpec, current: CatalogModel) -> ModelSpec:
    """Fill what an import left unset (status, weight, aliases) from the stored row.

    A listed row that is retired comes back as registered: importing it is asking for it.
    """
    status = spec.status
    if status is None:
        status = "registered" if current.status_name == "retired" else current.status_name
    return replace(
        spec,
        status=status,
        traffic_weight=current.traffic_weight if spec.traffic_weight is None else spec.traffic_weight,
        aliases=current.aliases if spec.aliases is None else spec.aliases,
    )
