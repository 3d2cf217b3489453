"""The scoring benchmark's peer: verl's own old-log-prob recompute, on the same requests.

A verl user compares the server against what their trainer already does, so this baseline is
verl's `TrainingWorker.infer_batch` (FSDP2, remove-padding, dynamic batch size with the same
token budget as ours, the same dtype), fed the way `RayPPOTrainer._compute_old_log_prob` feeds
it: a left-right padded batch (prompts left-padded, responses right-padded, as verl's agent loop
pads them) -> verl's `left_right_2_no_padding` -> `infer_batch` -> verl's `no_padding_2_padding`.

verl's fused-linear log-prob path (`use_fused_kernels` with its FSDP engine's default `torch`
backend: chunks of 512 tokens through the LM head with log-prob and entropy, never the whole
logits; the opt-in `triton` backend needs a GPU) runs on the same worker: `fused_linear_forward` puts verl's own fused
forward on the worker's model for the call and `verl_recompute(..., fused=True)` asks for it, as
a trainer with `actor_rollout_ref.model.use_fused_kernels=True` would. One worker serves both
paths, so a 1.5B run does not hold a third copy of the model. (The server's own verl backend
refuses fused kernels: they take one temperature per batch, the server one per request.)

The worker comes from the project's own builder (`backend: verl`, `build_engine("verl", ...)`),
so it is set up exactly as the server's verl backend sets it up: platform, one-process group,
the actor's FSDP2 engine. verl is optional: without it `verl_available()` is false and the
scoring benchmark reports the verl figures as skipped instead of failing.
"""

from __future__ import annotations

import importlib.util
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

import torch

from model_engine_server.config.verl_engine import VerlEngineConfig
from model_engine_server.engines.base import EngineSpec, build_engine
from model_engine_server.protocol import LogProbRequest

if TYPE_CHECKING:
    from tensordict import TensorDict

    from model_engine_server.engines.verl_backend.engine import VerlEngine

# verl's precision names for the dtypes the benchmark runs
VERL_DTYPE = {"float32": "fp32", "bfloat16": "bf16"}
SKIPPED_NOTE = "verl not installed (pip install 'model-engine-server[verl]'): verl baseline skipped"


def verl_available() -> bool:
    """verl and the tensordict it batches with are importable (the optional `verl` extra)."""
    return all(importlib.util.find_spec(name) is not None for name in ("verl", "tensordict"))


def verl_engine_config(dtype: str, token_budget: int) -> VerlEngineConfig:
    """The trainer's best old-log-prob settings: remove-padding, dynamic batch size with our
    token budget, no torch.compile, and the benchmark's dtype for parameters and compute (the
    reductions in fp32, as verl's mixed-precision default has them)."""
    precision = VERL_DTYPE[dtype]
    return VerlEngineConfig(
        strategy="fsdp2",
        model={"use_remove_padding": True},
        engine={
            "use_dynamic_bsz": True,
            "infer_max_token_len_per_gpu": token_budget,
            "use_torch_compile": False,
            "model_dtype": precision,
            "mixed_precision": {"param_dtype": precision, "reduce_dtype": "fp32", "buffer_dtype": "fp32"},
        },
    )


def build_verl(model_path: str, dtype: str, token_budget: int) -> "VerlEngine":
    """verl's worker for this checkpoint, through the server's own verl backend builder (the
    caller closes it: it may own the process group)."""
    spec = EngineSpec(model_path=model_path, dtype=dtype, verl_engine=verl_engine_config(dtype, token_budget))
    return build_engine("verl", spec)  # type: ignore[return-value]


def left_right_batch(requests: list[LogProbRequest]) -> "TensorDict":
    """The requests as verl's agent loop hands them to the trainer: prompts left-padded to the
    longest prompt, responses right-padded to the longest response, one attention mask."""
    from tensordict import TensorDict

    prompts = [r.input_ids[: r.response_start] for r in requests]
    responses = [r.input_ids[r.response_start :] for r in requests]
    width_p, width_r = max(map(len, prompts)), max(map(len, responses))
    size = len(requests)
    prompt_ids = torch.zeros(size, width_p, dtype=torch.long)
    response_ids = torch.zeros(size, width_r, dtype=torch.long)
    attention = torch.zeros(size, width_p + width_r, dtype=torch.long)
    response_mask = torch.zeros(size, width_r, dtype=torch.long)
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        prompt_ids[row, width_p - len(prompt) :] = torch.tensor(prompt)
        attention[row, width_p - len(prompt) : width_p] = 1
        response_ids[row, : len(response)] = torch.tensor(response)
        attention[row, width_p : width_p + len(response)] = 1
        response_mask[row, : len(response)] = 1
    return TensorDict(
        {"prompts": prompt_ids, "responses": response_ids, "input_ids": torch.cat([prompt_ids, response_ids], 1),
         "attention_mask": attention, "response_mask": response_mask,
         "position_ids": (attention.cumsum(1) - 1).clamp(min=0)},
        batch_size=[size],
    )


def single_temperature(requests: list[LogProbRequest]) -> float:
    """The trainer passes one temperature per batch (its rollout's); so does this baseline."""
    temperatures = {r.temperature for r in requests}
    if len(temperatures) != 1:
        raise ValueError(f"the verl baseline takes one temperature per batch, got {sorted(temperatures)}")
    return float(temperatures.pop())


# verl's fused-linear backend: its FSDP engine's default (`fused_kernel_options.impl_backend:
# torch` in verl 0.9.1's model config) on a GPU too, and the one that runs on a CPU. The `triton`
# backend is opt-in there, needs a hidden size divisible by 128 and takes fp32 GEMMs at TF32.
FUSED_BACKEND = "torch"


@contextmanager
def fused_linear_forward(engine: "VerlEngine") -> Iterator[None]:
    """verl's fused-linear forward on the worker's model while the block runs.

    verl patches the forward onto the model's class (`patch_forward_with_backends`). The
    worker's model is an instance of FSDP2's subclass of the HF class, one subclass per HF class
    in the process, so every FSDP2-wrapped model of that class takes the fused forward while the
    block runs (the benchmark holds one); afterwards the subclass has its own forward back, or
    none, and inherits the HF one the plain path runs."""
    from verl.models.transformers.monkey_patch import patch_forward_with_backends

    module = engine.worker.engine.module
    model_class = type(module)
    own_forward = model_class.__dict__.get("forward")
    backend_before = module.__dict__.get("_verl_fused_kernels_backend")  # verl sets it beside the forward
    patch_forward_with_backends(module, use_fused_kernels=True, fused_kernels_backend=FUSED_BACKEND)
    try:
        yield
    finally:
        if own_forward is None:
            del model_class.forward
        else:
            model_class.forward = own_forward
        if backend_before is None:
            module.__dict__.pop("_verl_fused_kernels_backend", None)
        else:
            module.__dict__["_verl_fused_kernels_backend"] = backend_before


def verl_recompute(engine: "VerlEngine", requests: list[LogProbRequest],
                   token_budget: int | None = None, fused: bool = False) -> list[torch.Tensor]:
    """verl's log-probs of each request's response tokens, in request order.

    Entropy is computed only if a request asks for it, so verl does the same work the server
    path does (the trainer always asks for it; that would only slow verl down here).
    `token_budget` overrides the worker's dynamic-batch token budget for this call (verl reads
    `max_token_len_per_gpu` from the batch before its config), which repacks its micro-batches.
    `fused`: verl's fused-linear log-prob path (which computes entropy whether asked or not).
    """
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import left_right_2_no_padding, no_padding_2_padding

    with torch.inference_mode(False):  # FSDP2 needs parameter version counters; verl disables autograd
        data = left_right_2_no_padding(left_right_batch(requests))
        tu.assign_non_tensor(data, calculate_entropy=any(r.return_entropy for r in requests), compute_loss=False,
                             temperature=single_temperature(requests))
        if token_budget is not None:
            tu.assign_non_tensor(data, max_token_len_per_gpu=token_budget)
        if fused:
            tu.assign_non_tensor(data, use_fused_kernels=True)
            with fused_linear_forward(engine):
                output = engine.worker.infer_batch(data)
        else:
            output = engine.worker.infer_batch(data)
        log_probs = no_padding_2_padding(tu.get(output, "log_probs"), data).float().cpu()  # as the server's are
    return [log_probs[row, : r.num_response_tokens] for row, r in enumerate(requests)]


def agreement(server: list[torch.Tensor], verl: list[torch.Tensor]) -> float:
    """Largest |server - verl| over every response token (0 for identical numbers), on the CPU
    whichever device each side's values are on."""
    return max((a.float().cpu() - b.float().cpu()).abs().max().item() for a, b in zip(server, verl, strict=True))


def skipped_figures(prefix: str) -> dict[str, Any]:
    """What the report shows when verl is absent: a note, no numbers (its targets read 'not measured')."""
    return {f"{prefix}verl_baseline": SKIPPED_NOTE}
