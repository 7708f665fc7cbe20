from llmesh.common.migrations import run_env

run_env()
