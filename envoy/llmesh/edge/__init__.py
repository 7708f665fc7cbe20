"""The Envoy edge of llmesh: its config generator, validation and a supervised Envoy process.

settings = EdgeSettings.from_config(cfg, default_descriptor_path())
validate(render_yaml(settings))
async with EnvoyProcess(settings, run_dir) as envoy: ...
"""

import warnings

# envoy-data-plane's generated classes trip pydantic>=2.12 deprecation warnings at import, once
# per module; they say nothing about llmesh, so they are silenced here, for those modules only.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"envoy_data_plane(\.|$)")
    from llmesh.edge.bootstrap import render_bootstrap, render_yaml

from llmesh.edge.descriptor import default_descriptor_path
from llmesh.edge.process import EnvoyProcess, EnvoyStartError
from llmesh.edge.settings import EdgeSettings, EdgeSettingsError
from llmesh.edge.validate import EnvoyConfigError, EnvoyNotFound, find_envoy, validate

__all__ = [
    "EdgeSettings",
    "EdgeSettingsError",
    "EnvoyConfigError",
    "EnvoyNotFound",
    "EnvoyProcess",
    "EnvoyStartError",
    "default_descriptor_path",
    "find_envoy",
    "render_bootstrap",
    "render_yaml",
    "validate",
]
