"""Subcommands of `model-engine-server`; see `model_engine_server.cli`."""
