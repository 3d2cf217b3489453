"""The `model_engine_server:` section of a fully-async training config, as pydantic models.

Users start the server with the very YAML and override list they launch training with, so the
section keeps the names users of the reference design already write (`enable_standalone`,
`nnodes`, `n_gpus_per_node`, `megatron.tensor_model_parallel_size`, ...). Reading the YAML
lives in `loader.py`, Hydra overrides in `overrides.py`, the reference design's aliases and
inheritance from the trainer's keys in `verl.py`; this module only says what a valid, fully
resolved section is. The `scheduler:` part is `scheduler.py`'s `SchedulerConfig`, the
`transport:` part the one `checkpoint_transport.TransportConfig` (plus the server's allow-list).

Every model forbids unknown keys: a typo such as `megatron.tensor_parallel_size` is an error
that names the key and the valid ones, never a silently ignored setting. The defaults serve a
small model on one CPU machine.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from checkpoint_transport.spec import TransportConfig
from model_engine_server.config.scheduler import SchedulerConfig
from model_engine_server.config.trainer_side import TrainerSideConfig
from model_engine_server.config.verl_engine import VerlEngineConfig
from model_engine_server.cpu_heap import CpuHeap
from model_engine_server.temperature import MAX_TEMPERATURE, MIN_TEMPERATURE

if TYPE_CHECKING:  # the schema needs no engine (torch) module; `engine_spec` imports it when called
    from model_engine_server.engines.base import EngineSpec

SECTION = "model_engine_server"
Backend = Literal["hf", "megatron", "verl"]


class ConfigError(ValueError):
    """A config the server cannot start with; the message names the key(s) and what is valid."""


class MegatronParallelConfig(BaseModel):
    """Model parallelism of ONE replica (the Megatron backend). Unset sizes are inherited from
    `actor_rollout_ref.actor.megatron.*` by the loader, as the reference design does."""

    model_config = ConfigDict(extra="forbid")

    tensor_model_parallel_size: int = Field(default=1, ge=1)
    pipeline_model_parallel_size: int = Field(default=1, ge=1)
    context_parallel_size: int = Field(default=1, ge=1)
    expert_model_parallel_size: int = Field(default=1, ge=1)
    expert_tensor_parallel_size: int | None = Field(default=None, ge=1, description="None: same as TP")
    virtual_pipeline_model_parallel_size: int | None = Field(default=None, ge=1)

    @property
    def gpus_per_replica(self) -> int:
        """Devices one model-parallel group needs (data parallelism is the number of replicas)."""
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size * self.context_parallel_size


class HttpConfig(BaseModel):
    """The HTTP front end. Binds to loopback unless told otherwise: the admin routes change
    what the trainer receives, so exposing them is a decision, not a default."""

    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535, description="0 lets the OS pick a free port")
    auth_token: SecretStr | None = Field(default=None, description="bearer token for admin routes")
    auth_token_env: str | None = Field(
        default="MODEL_ENGINE_SERVER_TOKEN", description="environment variable holding the token (kept out of YAML)"
    )
    allow_unauthenticated_remote: bool = Field(
        default=False,
        description="serve on a non-loopback host with no admin token (a loud warning); else `serve` refuses to start",
    )
    max_body_mb: float = Field(default=64.0, gt=0, description="largest /v1/logprobs body; more is 413")
    max_weights_body_mb: float = Field(default=4096.0, gt=0, description="largest /v1/update_weights body")
    max_requests_per_call: int = Field(default=4096, gt=0)
    retry_after_s: float = Field(default=1.0, ge=0, description="Retry-After sent with 429/503")
    graceful_shutdown_s: float = Field(default=60.0, gt=0, description="longest a SIGTERM drain may take")

    def token(self, environ: dict[str, str] | None = None) -> str | None:
        """The admin token: the explicit value, else the named environment variable, else none."""
        import os

        if self.auth_token is not None and self.auth_token.get_secret_value():
            return self.auth_token.get_secret_value()
        if self.auth_token_env:
            value = (environ if environ is not None else os.environ).get(self.auth_token_env)
            return value or None
        return None

    def with_token_resolved(self, environ: dict[str, str] | None = None) -> "HttpConfig":
        """This config with the token read here set as `auth_token`: for an app built in another
        process (the Ray service actor), whose environment is the cluster's, not this one's."""
        token = self.token(environ)
        return self if token is None else self.model_copy(update={"auth_token": SecretStr(token)})


class ServerTransportConfig(TransportConfig):
    """The section's `transport:` part: the deployment's one transport config, plus the allow-list.

    The fields of `TransportConfig` (backend, bucket_bytes, timeout_s, address, ...) are what the
    trainer's publisher uses: it reads them from the same YAML the server starts with
    (`WeightPublisher(target, load_config(path).server.transport)`). The server itself reads
    `bucket_bytes` (the bucket size of weight copies between its own replicas) and
    `allowed_endpoints`, which only the server has: the transport endpoints
    `/v1/weights/receive` may make its workers join.
    """

    allowed_endpoints: list[str] = Field(
        default_factory=list,
        description="hosts or CIDRs /v1/weights/receive may make the workers join, besides loopback and "
        "the nodes of the server's Ray cluster (always allowed)",
    )

    @field_validator("allowed_endpoints")
    @classmethod
    def _check_endpoints(cls, entries: list[str]) -> list[str]:
        """A CIDR with host bits set (10.0.0.5/8) is accepted as its network; an empty entry or a
        malformed CIDR is an error here rather than an endpoint silently never matched."""
        import ipaddress

        for entry in entries:
            if not entry.strip():
                raise ValueError("an empty entry in allowed_endpoints")
            if "/" in entry:
                try:
                    ipaddress.ip_network(entry.strip(), strict=False)
                except ValueError as error:
                    raise ValueError(f"allowed_endpoints entry {entry!r} is not a CIDR: {error}") from None
        return [entry.strip() for entry in entries]


class RayConfig(BaseModel):
    """Where the replicas run: an embedded Ray by default, a running cluster when `address` is set."""

    model_config = ConfigDict(extra="forbid")

    address: str | None = Field(default=None, description="None: start Ray here; 'auto' or 'ray://h:10001': join")
    namespace: str = Field(default="model-engine-server", description="the Ray namespace of the service and its replicas")
    actor_name: str = Field(default="model-engine-server", min_length=1,
                            description="`serve`'s named service actor, which trainers and verl look up")
    num_cpus: int | None = Field(default=None, ge=1, description="embedded Ray only")
    num_gpus: int | None = Field(default=None, ge=0, description="embedded Ray only")
    object_store_memory_mb: int | None = Field(default=None, gt=0, description="embedded Ray only")
    health_check_interval_s: float = Field(default=10.0, gt=0, description="how often every worker is pinged")
    auto_restart: bool = Field(default=True, description="restart a dead replica; weights copied from a live one")
    max_restarts: int = Field(default=3, ge=0, description="automatic restarts per replica")


class RefConfig(BaseModel):
    """Devices of the frozen reference policy (ref mode); default: the policy's."""

    model_config = ConfigDict(extra="forbid")

    nnodes: int | None = Field(default=None, ge=1)
    n_gpus_per_node: int | None = Field(default=None, ge=1)


class ServerConfig(BaseModel):
    """The resolved `model_engine_server:` section."""

    model_config = ConfigDict(extra="forbid")

    enable_standalone: bool = Field(default=True, description="the trainer uses the server (alias: enable)")
    enable_old_mode: bool = Field(default=True, description="serve the policy, following every weight sync")
    enable_ref_mode: bool = Field(default=False, description="also serve the frozen reference policy")
    ref_model_path: str | None = Field(default=None, description="reference checkpoint; None: model_path")
    ref: RefConfig = Field(default_factory=RefConfig)

    backend: Backend = Field(default="hf", description="hf, megatron or verl (the trainer's own engine; alias: strategy, where fsdp means hf)")
    model_path: str | None = Field(default=None, description="HF checkpoint; None: actor_rollout_ref.model.path")
    weight_roots: list[str] = Field(
        default_factory=list,
        description="folders /v1/update_weights_from_disk may read (symlinks followed); []: the parent folder of model_path",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    attn_implementation: str | None = None
    logprob_chunk_mb: int = Field(default=128, gt=0)
    share_prompts: bool = Field(
        default=True, description="run identical prompts in a batch once (a GRPO group's samples; HF engine, packed attention)"
    )
    cpu_heap: CpuHeap = Field(
        default="auto",
        description="keep: freed CPU memory stays in the heap for reuse (no page faults per batch); auto: in processes the "
        "server owns (Ray workers, serve), not in a trainer hosting an in-process server; system: glibc's default",
    )
    temperature: float = Field(
        default=1.0, ge=MIN_TEMPERATURE, le=MAX_TEMPERATURE, description="used when a request names none; default: actor_rollout_ref.rollout.temperature"
    )
    initial_weight_version: int = Field(default=0, ge=0)
    batch_timeout_s: float = Field(
        default=600.0, gt=0, description="a batch running longer fails (WorkerFailed) and its engine takes no more work"
    )

    nnodes: int = Field(default=1, ge=1)
    n_gpus_per_node: int | None = Field(default=None, ge=1, description="None: what the replicas need, on one node")
    num_replicas: int | None = Field(default=None, ge=1, description="None: as many as the devices hold")
    runtime: Literal["auto", "in_process", "ray"] = Field(
        default="auto", description="auto: in this process for one single-device replica, else Ray replicas"
    )
    megatron: MegatronParallelConfig = Field(default_factory=MegatronParallelConfig)
    verl_engine: VerlEngineConfig = Field(
        default_factory=VerlEngineConfig,
        description="backend verl: the trainer's model and engine settings (inherited from actor_rollout_ref)",
    )

    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    transport: ServerTransportConfig = Field(default_factory=ServerTransportConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    trainer: TrainerSideConfig = Field(default_factory=TrainerSideConfig)

    @model_validator(mode="after")
    def _check_placement(self) -> "ServerConfig":
        check_placement(self)
        return self

    @field_validator("model_path", "ref_model_path")
    @classmethod
    def _expand_home(cls, path: str | None) -> str | None:
        """`~/...` as a shell would read it (the trainer's own model path is expanded too)."""
        return None if path is None else os.path.expanduser(path)

    @field_validator("weight_roots")
    @classmethod
    def _expand_home_of_roots(cls, roots: list[str]) -> list[str]:
        return [os.path.expanduser(root) for root in roots]

    @model_validator(mode="after")
    def _in_process_is_one_replica(self) -> "ServerConfig":
        """`runtime: in_process` builds one engine on one device in this process: a layout of
        several replicas, a model-parallel replica or a Ray cluster would be silently shrunk."""
        if self.runtime == "in_process":
            asked = {"replicas": self.replicas, "gpus_per_replica": self.gpus_per_replica, "nnodes": self.nnodes}
            wider = {name: value for name, value in asked.items() if value != 1}
            if wider or self.ray.address is not None:
                what = ", ".join(f"{name}={value}" for name, value in wider.items())
                what = what or f"{_key('ray.address')}={self.ray.address}"
                raise ConfigError(f"{_key('runtime')}=in_process serves one single-device replica in this process, "
                                  f"but the layout asks for {what}; use runtime ray (or auto)")
        return self

    @model_validator(mode="after")
    def _verl_engine_needs_backend_verl(self) -> "ServerConfig":
        """verl's engine settings mean nothing to the other backends: setting them there is a
        mistake (which backend was meant?), never silently ignored."""
        if self.backend != "verl" and not self.verl_engine.is_default:
            raise ConfigError(
                f"{_key('verl_engine')} is set, but {_key('backend')}={self.backend}; it configures backend verl only"
            )
        return self

    @model_validator(mode="after")
    def _one_temperature(self) -> "ServerConfig":
        """`temperature` is the one key for unset request temperatures; every scheduler (in
        process, each replica's, the reference's) resolves requests with it at admission."""
        scheduler = self.scheduler
        if "default_temperature" in scheduler.model_fields_set and scheduler.default_temperature != self.temperature:
            raise ConfigError(
                f"{_key('scheduler.default_temperature')} is derived from {_key('temperature')}; set that instead"
            )
        self.scheduler = scheduler.model_copy(update={"default_temperature": self.temperature})
        return self

    # ---------------------------------------------------------------- derived
    @property
    def gpus_per_replica(self) -> int:
        return self.megatron.gpus_per_replica if self.backend == "megatron" else 1

    @property
    def gpus_per_node(self) -> int:
        if self.n_gpus_per_node is not None:
            return self.n_gpus_per_node
        return math.ceil(self.gpus_per_replica * (self.num_replicas or 1) / self.nnodes)

    @property
    def total_gpus(self) -> int:
        return self.nnodes * self.gpus_per_node

    @property
    def reference_gpus(self) -> int:
        """Devices the reference policy takes beside the policy's in ref mode (`ref.nnodes` x
        `ref.n_gpus_per_node`, each defaulting to the policy's); 0 without ref mode."""
        if not self.enable_ref_mode:
            return 0
        return (self.ref.nnodes or self.nnodes) * (self.ref.n_gpus_per_node or self.gpus_per_node)

    @property
    def replicas(self) -> int:
        return self.num_replicas or self.total_gpus // self.gpus_per_replica

    @property
    def in_process(self) -> bool:
        """One single-device replica on this machine needs no Ray at all."""
        if self.runtime != "auto":
            return self.runtime == "in_process"
        return self.replicas == 1 and self.gpus_per_replica == 1 and self.nnodes == 1 and self.ray.address is None

    def engine_spec(self, model_path: str | None = None) -> EngineSpec:
        from model_engine_server.engines.base import EngineSpec

        return EngineSpec(
            model_path=model_path or self.model_path,
            dtype=self.dtype,
            device=self.device,
            attn_implementation=self.attn_implementation,
            logprob_chunk_mb=self.logprob_chunk_mb,
            share_prompts=self.share_prompts,
            cpu_heap=self.cpu_heap,
            verl_engine=self.verl_engine,
        )


def _key(name: str) -> str:
    return f"{SECTION}.{name}"


def check_placement(config: ServerConfig) -> None:
    """Refuse a parallel layout the configured devices cannot hold, naming keys and numbers."""
    megatron = config.megatron
    if config.backend == "megatron":
        tp, pp, cp = (
            megatron.tensor_model_parallel_size,
            megatron.pipeline_model_parallel_size,
            megatron.context_parallel_size,
        )
        layout = (
            f"{_key('megatron.tensor_model_parallel_size')}={tp} x pipeline_model_parallel_size={pp} "
            f"x context_parallel_size={cp} = {tp * pp * cp} devices per replica"
        )
        etp = megatron.expert_tensor_parallel_size or tp
        ep = megatron.expert_model_parallel_size
        if (tp * cp) % (ep * etp):
            raise ConfigError(
                f"{_key('megatron.expert_model_parallel_size')}={ep} x expert_tensor_parallel_size={etp} "
                f"= {ep * etp} must divide tensor_model_parallel_size={tp} x context_parallel_size={cp} "
                f"= {tp * cp} (one replica has no data parallelism of its own)"
            )
        if megatron.virtual_pipeline_model_parallel_size is not None and pp == 1:
            raise ConfigError(
                f"{_key('megatron.virtual_pipeline_model_parallel_size')}="
                f"{megatron.virtual_pipeline_model_parallel_size} needs pipeline_model_parallel_size > 1, got 1"
            )
        unsupported = {
            "context_parallel_size": cp != 1,
            "expert_model_parallel_size": ep != 1,
            "virtual_pipeline_model_parallel_size": megatron.virtual_pipeline_model_parallel_size is not None,
        }
        named = [_key(f"megatron.{key}") for key, used in unsupported.items() if used]
        if named:
            raise ConfigError(f"{', '.join(named)}: not supported by this build's Megatron engine (TP and PP are); "
                              "set it to 1 (none for the virtual pipeline)")
    else:
        layout = f"{_key('backend')}={config.backend}: 1 device per replica"
    per_replica = config.gpus_per_replica
    per_node = config.gpus_per_node
    total = config.total_gpus
    devices = f"{_key('nnodes')}={config.nnodes} x n_gpus_per_node={per_node} = {total} devices"
    if per_replica > total:
        raise ConfigError(f"{layout}, but {devices}")
    if per_replica > per_node and per_replica % per_node:
        raise ConfigError(f"{layout} would split a node: with {devices}, a replica must fill whole nodes")
    if per_replica <= per_node and per_node % per_replica:
        raise ConfigError(
            f"{layout} leaves devices idle or straddling nodes: {_key('n_gpus_per_node')}={per_node} "
            f"is not a multiple of {per_replica}"
        )
    if config.num_replicas is None and total % per_replica:
        raise ConfigError(f"{layout} does not divide {devices}")
    if config.num_replicas is not None and config.num_replicas * per_replica > total:
        raise ConfigError(
            f"{_key('num_replicas')}={config.num_replicas} x {per_replica} devices per replica "
            f"= {config.num_replicas * per_replica} devices, but {devices}"
        )
