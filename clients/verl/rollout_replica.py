"""Registers our replicas in verl's `RolloutReplicaRegistry` as `model_engine_server`.

Imported by the verl plugin (`clients.verl.plugin`) right after `verl.workers.rollout.replica`
loads, which can be half-way through `verl.workers.rollout`'s own `__init__`: so this module
imports nothing else from verl, and the class (`clients.verl.scoring_replica`) is loaded only
when a config asks for it, the way verl registers its own vLLM/SGLang replicas.
"""

from __future__ import annotations

from verl.workers.rollout.replica import RolloutReplica, RolloutReplicaRegistry

ROLLOUT_NAME = "model_engine_server"


def load_replica_class() -> type[RolloutReplica]:
    from clients.verl.scoring_replica import ModelEngineServerReplica

    return ModelEngineServerReplica


RolloutReplicaRegistry.register(ROLLOUT_NAME, load_replica_class)
