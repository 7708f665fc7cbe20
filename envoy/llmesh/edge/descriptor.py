"""The descriptor set from `make gen`: where it is, and which REST routes it declares."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DESCRIPTOR_NAME = "llmesh_descriptor.pb"


class DescriptorNotFound(FileNotFoundError):
    """No descriptor set next to the generated modules: run `make gen`."""


def default_descriptor_path() -> Path:
    """The descriptor set shipped with the generated `llmesh` modules (gen/llmesh/)."""
    import llmesh  # a namespace package: services/, gen/ and envoy/ each add a directory

    for root in llmesh.__path__:
        candidate = Path(root) / DESCRIPTOR_NAME
        if candidate.is_file():
            return candidate.resolve()
    raise DescriptorNotFound(f"{DESCRIPTOR_NAME} not found in {list(llmesh.__path__)}; run `make gen`")


@dataclass(frozen=True)
class HttpRoute:
    """One google.api.http binding of an RPC."""

    service: str  # full name, llmesh.model.v1.ModelService
    method: str  # ListModels
    verb: str  # GET, POST, PUT, PATCH, DELETE
    path: str  # /v1/models/{model}
    body: str  # "*", a field name, or "" for none
    server_streaming: bool
    # The request message's fields, by proto name and by JSON name (the transcoder takes both).
    request_fields: frozenset[str] = frozenset()

    @property
    def grpc_path(self) -> str:
        """The HTTP/2 path of the RPC, /llmesh.model.v1.ModelService/ListModels."""
        return f"/{self.service}/{self.method}"


def http_routes(descriptor_path: Path) -> list[HttpRoute]:
    """Every google.api.http binding (additional_bindings included) in the descriptor set."""
    from google.api import annotations_pb2, http_pb2
    from google.protobuf import descriptor_pb2

    files = descriptor_pb2.FileDescriptorSet.FromString(descriptor_path.read_bytes())
    fields_of = {
        f".{file.package}.{message.name}": frozenset(
            name for field in message.field for name in (field.name, field.json_name or field.name)
        )
        for file in files.file
        for message in file.message_type
    }
    routes: list[HttpRoute] = []
    for file in files.file:
        for service in file.service:
            full_name = f"{file.package}.{service.name}" if file.package else service.name
            for method in service.method:
                if not method.options.HasExtension(annotations_pb2.http):
                    continue
                rule: http_pb2.HttpRule = method.options.Extensions[annotations_pb2.http]
                for binding in (rule, *rule.additional_bindings):
                    verb = binding.WhichOneof("pattern")
                    if verb is None:
                        continue
                    path = binding.custom.path if verb == "custom" else getattr(binding, verb)
                    verb_name = binding.custom.kind if verb == "custom" else verb.upper()
                    routes.append(
                        HttpRoute(
                            service=full_name,
                            method=method.name,
                            verb=verb_name,
                            path=path,
                            body=binding.body,
                            server_streaming=method.server_streaming,
                            request_fields=fields_of.get(method.input_type, frozenset()),
                        )
                    )
    return routes


def rpc_names(descriptor_path: Path) -> dict[str, list[str]]:
    """Every service in the descriptor set (llmesh.* only) with its method names."""
    from google.protobuf import descriptor_pb2

    files = descriptor_pb2.FileDescriptorSet.FromString(descriptor_path.read_bytes())
    return {
        f"{file.package}.{service.name}": [method.name for method in service.method]
        for file in files.file
        if file.package.startswith("llmesh.")
        for service in file.service
    }
