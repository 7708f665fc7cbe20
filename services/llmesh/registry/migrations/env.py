"""Alembic environment of the registry: runs on the connection `llmesh.common.migrations` passes."""

from llmesh.common.migrations import run_env

run_env()
