"""verl's fully-async pipeline pieces on CPU, for the agent-loop and v0-trainer tests.

Everything here is verl's own code configured for a tiny local model, except two stand-ins for
what cannot run on this machine, each the smallest thing verl's code calls:

- `SamplingRollout`: the rollout engine (vLLM/SGLang need GPUs). It is verl's `LLMServerClient`
  with `generate` sampling from the tiny model in plain transformers at the requested
  temperature, returning a `TokenOutput` with the sampled tokens' log-probs and the weight
  version in `extra_fields["global_steps"]`, as a real replica does.
- `InProcessWorkerGroup`: a one-rank `RayWorkerGroup` (a Ray cluster with GPU bundles and a
  worker process per rank cannot start here). It forwards the trainer's calls to a real
  `DetachActorWorker` (verl's fully-async actor worker) built in this process on our CPU
  platform, as a one-rank group's dispatch would (copying what `save_model_to_cpu` keeps, which on
  a CPU machine would otherwise alias the live weights).

The tokenizer: verl pads with the model's tokenizer and builds prompts with its chat template,
so a byte-level tokenizer with a Qwen-style chat template is saved next to the tiny model.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from verl.experimental.fully_async_policy.detach_utils import RolloutSample, assemble_batch_from_rollout_samples
from verl.workers.rollout.llm_server import LLMServerClient
from verl.workers.rollout.replica import TokenOutput

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PROMPT_LENGTH = 48
RESPONSE_LENGTH = 24
SECTION = "model_engine_server"


def save_tokenizer(model_dir: Path, vocab_size: int = 512) -> None:
    """A byte-level tokenizer covering the tiny model's vocabulary (extra ids are added tokens)."""
    from tokenizers import Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tokenizer.add_tokens([f"<|extra_{i}|>" for i in range(vocab_size - len(tokenizer))])
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(model_dir)


def cpu_overrides(model_dir: Path, server_url: str, temperature: float) -> list[str]:
    """verl's shipped fully-async config, pointed at the tiny model and this machine: FSDP2 in
    fp32 without torch.compile (what runs on CPU, and what makes verl's recompute exact)."""
    actor = "actor_rollout_ref.actor"
    rollout = "actor_rollout_ref.rollout"
    return [
        f"actor_rollout_ref.model.path={model_dir}", "actor_rollout_ref.model.use_remove_padding=True",
        "+actor_rollout_ref.model.override_config={attn_implementation:sdpa}", "actor_rollout_ref.hybrid_engine=False",
        f"{actor}.strategy=fsdp2", f"{actor}.fsdp_config.use_torch_compile=False",
        f"+{actor}.fsdp_config.mixed_precision={{param_dtype:fp32,reduce_dtype:fp32,buffer_dtype:fp32}}",
        f"{actor}.use_dynamic_bsz=True", f"{actor}.ppo_max_token_len_per_gpu=4096", f"{actor}.ppo_mini_batch_size=4",
        f"{rollout}.log_prob_use_dynamic_bsz=True", f"{rollout}.log_prob_max_token_len_per_gpu=4096",
        f"{rollout}.name=vllm", f"{rollout}.prompt_length={PROMPT_LENGTH}", f"{rollout}.response_length={RESPONSE_LENGTH}",
        f"{rollout}.temperature={temperature}", f"{rollout}.multi_turn.enable=True",
        f"{rollout}.checkpoint_engine.backend=naive",
        "algorithm.rollout_correction.bypass_mode=False",
        "trainer.device=cpu", "trainer.logger=[console]", "trainer.n_gpus_per_node=1", "rollout.n_gpus_per_node=1",
        f"+{SECTION}.trainer.address={server_url}", f"+{SECTION}.trainer.timeout_s=60",
        f"+{SECTION}.trainer.join_weight_sync=false",  # an HTTP-only server: these runs deliver no weights
    ]


def compose_fully_async(overrides: Sequence[str]) -> DictConfig:
    """verl's `fully_async_ppo_trainer` Hydra config, composed as its main composes it."""
    from hydra import compose, initialize_config_dir
    from verl.experimental.fully_async_policy import fully_async_main

    config_dir = str(Path(fully_async_main.__file__).parent / "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return compose("fully_async_ppo_trainer", overrides=list(overrides))


def object_column(values: Sequence[Any]) -> np.ndarray:
    """A `non_tensor_batch` column: one object per sample (lists stay lists)."""
    column = np.empty(len(values), dtype=object)
    column[:] = list(values)
    return column


def with_settings(config: DictConfig, values: dict[str, Any]) -> DictConfig:
    """A copy of `config` with dotted keys set (e.g. `model_engine_server.trainer.on_missing`)."""
    config = copy.deepcopy(config)
    with open_dict(config):
        for key, value in values.items():
            OmegaConf.update(config, key, value, force_add=True)
    return config


class SamplingRollout(LLMServerClient):
    """The rollout engine stand-in (module docstring): verl's client, sampling in transformers.

    Response lengths cycle through `lengths`, so a batch has varied ones."""

    def __init__(self, config: DictConfig, model_dir: Path, version: int = 0, lengths: Sequence[int] = (3, 9, 5, 12, 7)):
        super().__init__(config)
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.version = version
        self._lengths = itertools.cycle(lengths)
        self._seeds = itertools.count()
        self.returned: dict[tuple[int, ...], list[float]] = {}  # generated tokens -> their log-probs

    async def generate(self, request_id: str, *, prompt_ids: list[int], sampling_params: dict[str, Any],
                       **kwargs: Any) -> TokenOutput:
        tokens, log_probs = sample(self.model, prompt_ids, float(sampling_params["temperature"]),
                                   next(self._lengths), next(self._seeds))
        self.returned[tuple(tokens)] = log_probs
        return TokenOutput(token_ids=tokens, log_probs=log_probs, stop_reason="completed",
                           extra_fields={"global_steps": self.version})


@torch.no_grad()
def sample(model: torch.nn.Module, prompt_ids: list[int], temperature: float, count: int, seed: int):
    """`count` tokens from `model` at `temperature` (greedy at 0) and their log-probs at it."""
    generator = torch.Generator().manual_seed(seed)
    ids, tokens, log_probs = list(prompt_ids), [], []
    for _ in range(count):
        logits = model(torch.tensor([ids])).logits[0, -1].float()
        if temperature > 0:
            step = torch.log_softmax(logits / temperature, -1)
            token = int(torch.multinomial(step.exp(), 1, generator=generator))
        else:
            step = torch.log_softmax(logits, -1)
            token = int(step.argmax())
        tokens.append(token)
        log_probs.append(float(step[token]))
        ids.append(token)
    return tokens, log_probs


class InProcessWorkerGroup:
    """A one-rank worker group around a worker object of this process (module docstring)."""

    def __init__(self, worker: Any) -> None:
        self.worker = worker
        self.calls: list[str] = []

    def _call(self, name: str, *args: Any) -> Any:
        self.calls.append(name)
        return getattr(self.worker, name)(*args)

    def compute_log_prob(self, data: Any) -> Any:
        return self._call("compute_log_prob", data)

    def compute_ref_log_prob(self, data: Any) -> Any:
        return self._call("compute_ref_log_prob", data)

    def save_model_to_cpu(self, n: int) -> None:
        """On a CPU machine the FSDP2 save's `.cpu()` returns the live shard itself, so the saved
        copy would follow every later update; copy it, as the device-to-host move does on a GPU."""
        self._call("save_model_to_cpu", n)
        state, spec = self.worker.cpu_saved_models[n]
        self.worker.cpu_saved_models[n] = ({name: (t.clone(), s) for name, (t, s) in state.items()}, spec)

    def restore_model_from_cpu(self, n: int) -> None:
        self._call("restore_model_from_cpu", n)

    def clear_cpu_model(self, n: int) -> None:
        self._call("clear_cpu_model", n)


def detach_actor_worker(config: DictConfig, role: str = "actor") -> Any:
    """verl's fully-async actor worker (`create_role_worker_mapping`'s class), in this process."""
    from tests.verl_reference import single_process_distributed

    single_process_distributed()
    from verl.experimental.separation.engine_workers import DetachActorWorker

    worker = DetachActorWorker(config.actor_rollout_ref, role=role)
    worker.init_model()
    return worker


@contextlib.contextmanager
def served(model_dir: Path, ref_mode: bool = False) -> Iterator[Any]:
    """Our server (HF backend) on uvicorn at 127.0.0.1, from its own config loader."""
    from model_engine_server.config import load_config
    from model_engine_server.launch import build_serving
    from tests.test_http_support import ServerThread

    loaded = load_config(None, [f"{SECTION}.model_path={model_dir}", f"{SECTION}.device=cpu",
                                f"{SECTION}.scheduler.max_wait_ms=1", f"{SECTION}.enable_ref_mode={str(ref_mode).lower()}",
                                f"{SECTION}.weight_roots=[{model_dir.parent}]"])
    with ServerThread(build_serving(loaded).app) as server:
        yield server


async def assemble(worker: Any, config: DictConfig, outputs: Sequence[Any], temperature: float) -> Any:
    """The trainer's batch from finished trajectories, as verl's fully-async rollouter and trainer
    assemble it (`AgentLoopWorker` post-processing per sample, the rollouter's uid)."""
    samples = []
    for index, output in enumerate(outputs):
        internal = await worker._agent_loop_postprocess(output, False, raw_prompt=[{"role": "user", "content": "q"}])
        single = worker._postprocess([internal])
        single.non_tensor_batch["uid"] = object_column([f"uid_sample_0_{index}"])  # as the rollouter tags it
        samples.append(RolloutSample(full_batch=single, sample_id=f"sample_0_{index}", epoch=0, rollout_status={}))
    batch = assemble_batch_from_rollout_samples(samples, worker.tokenizer, config, None)
    batch.meta_info["temperature"] = temperature  # what FullyAsyncTrainer._fit_generate sets
    return batch
