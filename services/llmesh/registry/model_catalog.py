"""ModelService's catalog reads (OpenAI `GET /v1/models`, scenarios), served by the registry.

They are off the token path, so they live next to the catalog instead of in a gateway process;
Envoy routes these three RPCs here and ModelService's inference RPCs to the workers.
"""

from __future__ import annotations

from typing import Any

from grpc import aio

from llmesh.common.errors import InvalidRequest
from llmesh.model.v1 import model_service_pb2 as pb
from llmesh.model.v1 import model_service_pb2_grpc as pb_grpc
from llmesh.registry.servicer import RegistryServicer
from llmesh.registry.v1 import registry_service_pb2 as registry_pb

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ModelService"].full_name


def model_card(model: registry_pb.Model) -> dict[str, Any]:
    """An OpenAI model object for a catalog model."""
    return {
        "id": model.name,
        "object": "model",
        "created": int(model.created_at.seconds),
        "owned_by": model.owned_by or "llmesh",
        "max_model_len": model.engine.max_model_len,
        "aliases": list(model.aliases),
        "ready_workers": model.ready_workers,
    }


class ModelCatalogServicer(pb_grpc.ModelServiceServicer):
    """ListModels, GetModel and ListScenarios from the registry's own catalog.

    The inference RPCs are not overridden: they answer UNIMPLEMENTED here, and the edge never
    routes them to the registry (workers serve them).
    """

    def __init__(self, registry: RegistryServicer) -> None:
        self._registry = registry

    async def _models(self, context: aio.ServicerContext) -> list[registry_pb.Model]:
        """One entry per model name: the catalog lists each live version (canaries) separately,
        clients see the model once (the scheduler splits traffic between its versions)."""
        response = await self._registry.ListModels(registry_pb.ListModelsRequest(), context)
        by_name: dict[str, registry_pb.Model] = {}
        for model in response.models:
            if model.status != registry_pb.MODEL_STATUS_RETIRED:
                by_name.setdefault(model.name, model)
        return list(by_name.values())

    async def _model(self, name: str, context: aio.ServicerContext) -> registry_pb.Model:
        if not name:
            raise InvalidRequest("model is required; list the served models with GET /v1/models (ListModels)")
        response = await self._registry.GetModel(registry_pb.GetModelRequest(name=name), context)
        return response.model

    async def ListModels(
        self, request: pb.ListModelsRequest, context: aio.ServicerContext
    ) -> pb.ListModelsResponse:
        """OpenAI `GET /v1/models`: every catalog model that is not retired."""
        models = await self._models(context)
        return pb.ListModelsResponse(object="list", data=[pb.ModelCard(**model_card(m)) for m in models])

    async def GetModel(
        self, request: pb.GetModelRequest, context: aio.ServicerContext
    ) -> pb.GetModelResponse:
        """OpenAI `GET /v1/models/{model}`, by name or alias."""
        return pb.GetModelResponse(**model_card(await self._model(request.model, context)))

    async def ListScenarios(
        self, request: pb.ListScenariosRequest, context: aio.ServicerContext
    ) -> pb.ListScenariosResponse:
        """Scenario templates of one model, or of all."""
        models = [await self._model(request.model, context)] if request.model else await self._models(context)
        return pb.ListScenariosResponse(
            scenarios=[
                pb.Scenario(
                    name=t.name, model=m.name, system_prompt=t.system_prompt, user_template=t.user_template
                )
                for m in models
                for t in m.templates
            ]
        )
