"""The `llmesh` command line."""
