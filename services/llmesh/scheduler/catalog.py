"""The picker's view of the model catalog: name and alias lookups at the registry, cached briefly."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import grpc
from grpc import aio

from llmesh.common.errors import DependencyDown, InvalidRequest, NotFound
from llmesh.registry.v1 import registry_service_pb2 as registry_pb
from llmesh.registry.v1 import registry_service_pb2_grpc as registry_grpc

log = logging.getLogger(__name__)


class ModelCatalog:
    """Resolves names and aliases to catalog models; caches answers for `ttl_s` seconds.

    Only a name never seen waits for the registry. An answer older than `ttl_s` is still used while
    a refresh runs in the background (one per name), so a request never pays a registry round trip
    (milliseconds) on the token path because the cache aged; a name the registry no longer knows is
    dropped when its refresh says so, and the next request gets NotFound.

    While the registry is unreachable (restarting, its database down) requests keep flowing: a
    name seen before resolves to its last known model, and a name the pool's live workers serve
    under exactly that name resolves to a bare model of that name (`served` tells which).
    """

    def __init__(
        self,
        registry: registry_grpc.RegistryServiceStub,
        ttl_s: float = 5.0,
        served: Callable[[str], bool] | None = None,
    ) -> None:
        self._registry = registry
        self._ttl_s = ttl_s
        self._served = served
        self._cache: dict[str, tuple[float, registry_pb.Model]] = {}
        self._refreshing: dict[str, asyncio.Task[None]] = {}

    async def resolve(self, name: str) -> registry_pb.Model:
        """The catalog model called `name` (or aliased so); NotFound says how to list models."""
        if not name:
            raise InvalidRequest("model is required; list the served models with GET /v1/models (ListModels)")
        hit = self._cache.get(name)
        if hit is not None:
            if time.monotonic() - hit[0] >= self._ttl_s and name not in self._refreshing:
                self._refreshing[name] = asyncio.create_task(self._refresh(name))
            return hit[1]
        return await self._fetch(name, None)

    async def _refresh(self, name: str) -> None:
        try:
            await self._fetch(name, self._cache.get(name))
        except NotFound:
            self._cache.pop(name, None)
        except Exception as error:  # the stale answer stays; the next request tries again
            log.warning("catalog refresh failed", extra={"model": name, "error": str(error)})
        finally:
            self._refreshing.pop(name, None)

    async def _fetch(self, name: str, hit: tuple[float, registry_pb.Model] | None) -> registry_pb.Model:
        """Ask the registry; on failure fall back to `hit` (the last known answer) if any."""
        now = time.monotonic()
        try:
            response = await self._registry.GetModel(registry_pb.GetModelRequest(name=name), timeout=5.0)
        except aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                raise NotFound(error.details() or f"model {name!r} does not exist") from None
            if hit is not None:
                return hit[1]
            if self._served is not None and self._served(name):
                return registry_pb.Model(name=name)
            raise DependencyDown(
                f"the registry is unavailable ({error.code().name}) and model {name!r} was not seen "
                "before; retry shortly"
            ) from None
        self._cache[name] = (now, response.model)
        return response.model
