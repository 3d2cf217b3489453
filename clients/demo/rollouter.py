"""The rollouter: samples groups of responses from its own copy of the policy with HF generate.

It records the rollout's own log-probs of each sampled token (from the processed scores
generate returns), so the server's log-probs can be compared with them (the rollout mismatch).
Weights arrive from the trainer after every update; a group is generated under one version.
"""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path
from typing import Any, Iterable

import torch

from clients.demo.task import TargetTokenTask

Sample = dict[str, Any]


class Rollouter:
    def __init__(self, model_path: Path, task: TargetTokenTask, group_size: int, response_len: int, temperature: float) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, local_files_only=True).eval()
        self.model.requires_grad_(False)
        self.task = task
        self.group_size = group_size
        self.response_len = response_len
        self.temperature = temperature
        self.version = 0
        self._lock = threading.Lock()  # a group is generated under one weight version
        self._group_ids = itertools.count()

    @torch.inference_mode()
    def generate_group(self) -> list[Sample]:
        prompt = self.task.sample_prompt()
        with self._lock:
            started = time.perf_counter()
            output = self.model.generate(
                prompt.repeat(self.group_size, 1),
                attention_mask=torch.ones(self.group_size, prompt.numel(), dtype=torch.long),
                do_sample=True,
                temperature=self.temperature,
                top_k=0,
                top_p=1.0,
                max_new_tokens=self.response_len,
                min_new_tokens=self.response_len,
                eos_token_id=None,
                pad_token_id=0,
                output_scores=True,
                return_dict_in_generate=True,
            )
            version = self.version
            generation_s = time.perf_counter() - started
        responses = output.sequences[:, prompt.numel():]
        # scores are the logits after temperature: their log-softmax is what was sampled from
        log_probs = torch.log_softmax(torch.stack(output.scores, dim=1).float(), dim=-1)
        rollout_log_probs = log_probs.gather(-1, responses.unsqueeze(-1)).squeeze(-1)
        rewards = self.task.reward(responses)
        group_id = next(self._group_ids)
        return [
            {
                "uid": f"g{group_id}-{index}",
                "group_id": group_id,
                "prompt_ids": prompt.tolist(),
                "response_ids": responses[index].tolist(),
                "rollout_log_probs": rollout_log_probs[index].numpy(),
                "reward": float(rewards[index]),
                "rollout_version": version,
                "generation_s": generation_s,
                "finished_at": time.perf_counter(),
            }
            for index in range(self.group_size)
        ]

    @torch.inference_mode()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Waits for the group being generated, like a rollout server paused around a sync."""
        state = self.model.state_dict()
        with self._lock:
            for name, tensor in named_tensors:
                state[name].copy_(tensor)
            self.version = version
