"""Runtime shared by every llmesh service: config, server bootstrap, errors, logs, channels."""
