"""The registry's Alembic history (version table `llmesh_registry_alembic_version`)."""
