"""Our log-prob server's replicas as verl rollout replicas, so verl's own weight sync reaches them.

verl's trainer pushes each policy version with `CheckpointEngineManager(config, actor_wg,
replicas).update_weights(global_steps)`. A `ModelEngineServerReplica` is one replica of a running
log-prob service (the Ray service actor, `replica.service_actor`) seen the way that manager sees a
rollout replica, so one call updates verl's vLLM/SGLang replicas and our scoring replicas
together, over the same checkpoint-engine backend (verl's `nccl` on GPUs, or our
`model_engine_server_gloo`, `clients.verl.checkpoint_engine`). The object holds only handles, so
verl may pickle it to another process (its fully-async trainer fetches replicas from the
rollouter); the state lives in the service actor and its workers.

What the manager calls, and what happens:
- `workers` are the replica's own `ModelEngineWorker` actors; their `execute_checkpoint_engine`
  and `update_weights(global_steps)` take part in the sync as a verl rollout worker's do, loading
  every received tensor straight into the engine inside the service's one update session to
  version `global_steps` (`replica.worker_driven`): committed only when every worker of every
  replica holds every tensor, otherwise aborted everywhere, the old version kept and nothing
  scored (requests wait, and time out naming the incomplete weights) until a complete sync. A
  version older than the one served is refused; the one served is not loaded again (verl's
  first sync carries the number the server already serves its checkpoint under, 0 or the step
  it resumed from).
- `abort_all_requests` pauses the whole service: batches running finish, requests arriving are
  held in the queue, never dropped (also with `reject_request`: a held request is bounded by its
  own deadline). `resume_generation` resumes; held requests are then answered with the new version.
  verl calls no resume after a sync that raised, so the service resumes by itself then: on the
  old weights if none were touched (a stale version refused), else with nothing scored (weights
  incomplete) until a complete sync.
- `release_kv_cache` / `resume_kv_cache` / `clear_kv_cache`: nothing to do, a forward-only
  scorer keeps no KV cache between requests (each batch's activations are freed with it).
- `sleep` / `wake_up`: nothing to do, the scoring replicas run on GPUs of their own and keep
  their weights resident (there is no trainer on those GPUs to make room for).
- `start_profile` / `stop_profile`: not supported, nothing happens.

The service is found by name, from the rollout config's `engine_kwargs.model_engine_server`
(`actor_name`, `ray_namespace`; default the actor `serve`/`start_service_actor` names). Replica
`replica_rank` of this pool is replica `replica_rank` of the service; the pool must hold every
replica of the service, since the service commits a version on all of them or on none.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

import ray
from omegaconf import DictConfig
from pydantic import BaseModel, ConfigDict, Field
from verl.checkpoint_engine.base import CheckpointEngine, CheckpointEngineManager, CheckpointEngineRegistry
from verl.utils.config import omega_conf_to_dataclass
from verl.utils.import_utils import import_external_libs
from verl.workers.config import CheckpointEngineConfig, HFModelConfig, RolloutConfig
from verl.workers.rollout.replica import RolloutReplica, RolloutReplicaRegistry

from clients.verl.rollout_replica import ROLLOUT_NAME
from model_engine_server.config.trainer_side import TrainerSideConfig
from replica.service_actor import DEFAULT_ACTOR_NAME, DEFAULT_NAMESPACE

logger = logging.getLogger(__name__)


class ScoringPoolOptions(BaseModel):
    """`engine_kwargs.model_engine_server` of the scoring pool's rollout config."""

    model_config = ConfigDict(extra="forbid")

    actor_name: str = Field(default=DEFAULT_ACTOR_NAME, description="the log-prob service's Ray actor")
    ray_namespace: str | None = Field(default=DEFAULT_NAMESPACE, description="its namespace (the server's "
                                      "`ray.namespace`); None: the caller's")

    @classmethod
    def of(cls, config: RolloutConfig) -> "ScoringPoolOptions":
        return cls.model_validate(dict(config.engine_kwargs.get(ROLLOUT_NAME) or {}))


def new_checkpoint_engine(config: CheckpointEngineConfig) -> CheckpointEngine:
    """A rollout worker's checkpoint engine, as verl's own rollout workers build theirs (the
    backend's plugin module imported first, verl's bucket size, the backend's `engine_kwargs`);
    runs inside each `ModelEngineWorker`."""
    import_external_libs(config.custom_backend_module or None)
    return CheckpointEngineRegistry.new(
        config.backend, bucket_size=config.update_weights_bucket_megabytes << 20, **config.engine_kwargs.get(config.backend, {})
    )


class ModelEngineServerReplica(RolloutReplica):
    """One replica of the log-prob service, driven by verl's `CheckpointEngineManager`."""

    def __init__(self, replica_rank: int, config: RolloutConfig | DictConfig, model_config: HFModelConfig,
                 gpus_per_node: int = 8, is_reward_model: bool = False, is_teacher_model: bool = False,
                 name_suffix: str = "") -> None:
        super().__init__(replica_rank, config, model_config, gpus_per_node, is_reward_model, is_teacher_model, name_suffix)
        self.options = ScoringPoolOptions.of(self.config)

    # ------------------------------------------------------------------ start-up
    async def init_standalone(self) -> None:
        """Attach to the running service's replica `replica_rank` (its GPUs are its own)."""
        await self._attach()

    async def init_hybrid(self, worker_group: Any) -> None:
        raise NotImplementedError(f"{ROLLOUT_NAME} replicas run on GPUs of their own: use init_standalone")

    async def init_hybrid_colocated(self, worker_group: Any, resource_pool: Any) -> None:
        raise NotImplementedError(f"{ROLLOUT_NAME} replicas run on GPUs of their own: use init_standalone")

    async def init_colocated(self, resource_pool: Any) -> None:
        raise NotImplementedError(f"{ROLLOUT_NAME} replicas run on GPUs of their own: use init_standalone")

    async def launch_servers(self) -> None:
        """The service is started by its own deployment (`serve`, `start_service_actor`); attach to it."""
        await self._attach()

    def _service(self) -> Any:
        return ray.get_actor(self.options.actor_name, namespace=self.options.ray_namespace)

    async def _attach(self) -> None:
        """Take the replica's current workers (a restarted replica has new ones) and give each a
        checkpoint engine of the configured backend, reporting to the service (once per worker)."""
        service = self._service()
        replicas = (await service.get_status.remote())["num_replicas"]
        if not 0 <= self.replica_rank < replicas:
            raise ValueError(f"replica_rank {self.replica_rank}: the service {self.options.actor_name!r} runs {replicas} replicas")
        workers = await service.worker_handles.remote(self.replica_rank)
        factory = functools.partial(new_checkpoint_engine, self.config.checkpoint_engine)
        await asyncio.gather(*(w.attach_checkpoint_engine.remote(factory, service, self.replica_rank) for w in workers))
        self.workers, self.servers, self._server_handle = workers, [service], service
        self.world_size = len(workers)

    # ------------------------------------------------------------------ what verl's manager calls
    async def abort_all_requests(self, reject_request: bool = False) -> None:
        """Pause the service (running batches finish; new requests are held, never dropped, also
        with `reject_request`), after taking the current workers: the manager reads `workers` next."""
        await self._attach()
        if reject_request:
            logger.info("%s holds requests while paused (reject_request is not applied)", ROLLOUT_NAME)
        await self._service().hold_for_worker_update.remote()

    async def resume_generation(self) -> None:
        """Resume scoring; the requests held meanwhile are answered with the version now served."""
        await self._service().release_after_worker_update.remote()

    async def release_kv_cache(self) -> None:
        """Nothing to release: a forward-only scorer keeps no KV cache between requests."""

    async def resume_kv_cache(self) -> None:
        """Nothing to restore (see `release_kv_cache`)."""

    async def clear_kv_cache(self) -> None:
        """Nothing cached across requests to clear."""

    async def sleep(self) -> None:
        """The scoring replicas own their GPUs: weights stay resident, nothing to free."""

    async def wake_up(self) -> None:
        """Nothing was freed by `sleep`."""

    async def start_profile(self, **kwargs: Any) -> None:
        """Profiling through verl is not supported here."""

    async def stop_profile(self) -> None:
        """Profiling through verl is not supported here."""


def scoring_service(actor_name: str, ray_namespace: str | None) -> Any:
    """The running service's Ray actor, or a start-up error saying how to make the join work."""
    try:
        return ray.get_actor(actor_name, namespace=ray_namespace)
    except ValueError:
        raise RuntimeError(
            f"model-engine-server: no Ray actor {actor_name!r} in namespace {ray_namespace!r} to join the "
            "trainer's weight sync; run the server on this Ray cluster (`serve` with "
            "model_engine_server.ray.address=auto), or set model_engine_server.trainer.join_weight_sync=false "
            "if its weights arrive another way (clients/publisher.py, /v1/update_weights_from_disk)"
        ) from None


def check_join_target(rules: TrainerSideConfig) -> None:
    """With `join_weight_sync`, the service must be running before the trainer builds anything:
    the join itself comes only after verl has started its workers and rollout servers."""
    if rules.join_weight_sync:
        scoring_service(rules.actor_name, rules.ray_namespace)


def scoring_rollout_config(checkpoint_engine: CheckpointEngineConfig, actor_name: str = DEFAULT_ACTOR_NAME,
                           ray_namespace: str | None = DEFAULT_NAMESPACE) -> RolloutConfig:
    """The rollout config of a scoring pool: our replica type, the trainer's checkpoint-engine
    settings (both ends of a sync must agree on backend and bucket size), where the service is."""
    return RolloutConfig(
        name=ROLLOUT_NAME, tensor_model_parallel_size=1, checkpoint_engine=checkpoint_engine,
        engine_kwargs={ROLLOUT_NAME: ScoringPoolOptions(actor_name=actor_name, ray_namespace=ray_namespace).model_dump()},
    )


async def scoring_replicas(config: RolloutConfig | DictConfig, model_config: HFModelConfig) -> list[RolloutReplica]:
    """The scoring pool: one verl replica per replica of the running service, looked up in verl's
    registry by the config's `name` and initialised standalone, ready for a
    `CheckpointEngineManager` (alone or with the rollout replicas: `add_replicas`)."""
    rollout_config = config if isinstance(config, RolloutConfig) else omega_conf_to_dataclass(config, RolloutConfig)
    options = ScoringPoolOptions.of(rollout_config)
    service = scoring_service(options.actor_name, options.ray_namespace)
    count = (await service.get_status.remote())["num_replicas"]
    replica_class = RolloutReplicaRegistry.get(rollout_config.name)
    replicas = [replica_class(rank, rollout_config, model_config) for rank in range(count)]
    await asyncio.gather(*(replica.init_standalone() for replica in replicas))
    return replicas


async def join_scoring_pool(manager: CheckpointEngineManager, training_config: DictConfig,
                            rules: TrainerSideConfig) -> list[RolloutReplica]:
    """Add every replica of the server named by `rules` to a trainer's checkpoint manager, with
    the trainer's own checkpoint-engine settings; what our trainer subclasses call once their
    manager exists (`model_engine_server.trainer.join_weight_sync=true`)."""
    checkpoint_engine = omega_conf_to_dataclass(training_config.actor_rollout_ref.rollout.checkpoint_engine)
    rollout_config = scoring_rollout_config(checkpoint_engine, rules.actor_name, rules.ray_namespace)
    pool = await scoring_replicas(rollout_config, training_config.actor_rollout_ref.model)
    manager.add_replicas(pool)
    logger.info("model-engine-server: %d scoring replicas of %r join the trainer's weight sync",
                len(pool), rules.actor_name)
    return pool
