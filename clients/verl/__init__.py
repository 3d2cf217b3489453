"""The verl integration: plugged in through verl's own extension points.

- `agent_loop`: a registered agent loop that scores each finished trajectory on the server;
- `trainer_v1`: a V1 trainer mode (`trainer.v1.trainer_mode=model_engine_server`);
- `fully_async_trainer` / `fully_async_main`: the same for `experimental/fully_async_policy`;
- `server_fields`: the fields both ends agree on, and the rules for unusable samples (pure);
- `connection`: the configured client (HTTP or Ray) the agent loop and the v0 trainer share;
- `dataproto_fields`: the server fields of a v0 `DataProto` batch, read back on the trainer;
- `plugin`: what verl's `verl.plugins` entry point loads.

Importing this package imports no verl; each module imports what it needs.
"""
