"""verl's own old-log-prob recompute, in this test process: the reference the verl tests compare to.

`TrainingWorker` (FSDP2, remove-padding, dynamic batch size, fp32) built from verl's own configs
on our CPU platform, fed the way `RayPPOTrainer._compute_old_log_prob` feeds it:
left-right padded batch -> `left_right_2_no_padding` -> `infer_batch` -> `no_padding_2_padding`.
One worker per (model path, attention) for the whole test run: building one costs seconds.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import torch



def single_process_distributed() -> None:
    """verl's Worker reads its rank from the environment and joins the default process group;
    give it a one-process gloo group (the same kind our Megatron engine starts)."""
    import torch.distributed as dist

    from model_engine_server.engines.verl_backend.cpu_platform import accelerator_present, use_cpu_platform

    if not accelerator_present():
        use_cpu_platform()
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "0"}.items():
        os.environ.setdefault(key, value)
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


@lru_cache(maxsize=4)
def training_worker(model_path: str, attn_implementation: str = "sdpa", use_dynamic_bsz: bool = True):
    """verl's `TrainingWorker`, set up as the actor is (FSDP2 with an optimizer), fp32."""
    single_process_distributed()
    from verl.workers.config import FSDPEngineConfig, FSDPOptimizerConfig, HFModelConfig, TrainingWorkerConfig
    from verl.workers.engine_workers import TrainingWorker

    fp32 = {"param_dtype": "fp32", "reduce_dtype": "fp32", "buffer_dtype": "fp32"}
    config = TrainingWorkerConfig(
        model_type="language_model",
        model_config=HFModelConfig(
            path=str(model_path), load_tokenizer=False, use_remove_padding=True,
            override_config={"attn_implementation": attn_implementation},
        ),
        engine_config=FSDPEngineConfig(
            strategy="fsdp2", use_dynamic_bsz=use_dynamic_bsz, infer_max_token_len_per_gpu=4096,
            infer_micro_batch_size_per_gpu=4, use_torch_compile=False, model_dtype="fp32", mixed_precision=fp32,
        ),
        optimizer_config=FSDPOptimizerConfig(lr=1e-6),
    )
    worker = TrainingWorker(config)
    worker.reset()
    return worker


def left_right_batch(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                     prompt_width: int | None = None, response_width: int | None = None):
    """A verl batch as the agent loop pads it: prompts left-padded, responses right-padded."""
    from tensordict import TensorDict

    batch = len(prompts)
    width_p = prompt_width or max(map(len, prompts))
    width_r = response_width or max(map(len, responses))
    prompt_ids = torch.zeros(batch, width_p, dtype=torch.long)
    response_ids = torch.zeros(batch, width_r, dtype=torch.long)
    attention = torch.zeros(batch, width_p + width_r, dtype=torch.long)
    response_mask = torch.zeros(batch, width_r, dtype=torch.long)
    for row, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        prompt_ids[row, width_p - len(prompt):] = torch.tensor(prompt)
        attention[row, width_p - len(prompt): width_p] = 1
        response_ids[row, : len(response)] = torch.tensor(response)
        attention[row, width_p: width_p + len(response)] = 1
        response_mask[row, : len(response)] = 1
    position_ids = (attention.cumsum(1) - 1).clamp(min=0)
    return TensorDict(
        {"prompts": prompt_ids, "responses": response_ids, "input_ids": torch.cat([prompt_ids, response_ids], 1),
         "attention_mask": attention, "response_mask": response_mask, "position_ids": position_ids},
        batch_size=[batch],
    )


def recompute(worker, batch, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's recompute of `batch` (a left-right padded TensorDict): `(old_log_probs, entropys)`,
    `(bsz, response_width)` float32, zeros past each response."""
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import left_right_2_no_padding, no_padding_2_padding

    data = left_right_2_no_padding(batch.clone())
    tu.assign_non_tensor(data, calculate_entropy=True, compute_loss=False, temperature=float(temperature))
    output = worker.infer_batch(data)
    log_probs = no_padding_2_padding(tu.get(output, "log_probs"), data).float()
    entropy = no_padding_2_padding(tu.get(output, "entropy"), data).float()
    return log_probs, entropy


def model_path_str(path: Path | str) -> str:
    return str(Path(path).resolve())
