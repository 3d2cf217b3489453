"""The trainer: GRPO-style advantages and a PPO clipped-ratio update on the old log-probs.

In server mode the old log-probs come with each sample (`engine_server_logprobs`); in the
baseline the trainer recomputes them itself before the update (the colocated path the server
replaces), which is the forward pass on the critical path this project removes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clients.agent_loop import ENTROPY_FIELD, LOG_PROBS_FIELD, VERSION_FIELD
from clients.demo.message_queue import Group
from clients.demo.proximal_approx import SampleLogProbs, step_metrics, clipped as clip_binds


def _stack(groups: list[Group]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    samples = [sample for group in groups for sample in group]
    sequences = torch.tensor([s["prompt_ids"] + s["response_ids"] for s in samples])
    rewards = torch.tensor([[s["reward"] for s in group] for group in groups])
    advantages = (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)
    prompt_len = len(samples[0]["prompt_ids"])
    return sequences, advantages.reshape(-1), rewards.reshape(-1), prompt_len


def proximal_samples(
    samples: list[dict[str, Any]], theta_logp: np.ndarray, advantages: np.ndarray, version: int
) -> list[SampleLogProbs]:
    """What the loglinear approximation needs of each sample: rollout (behaviour) log-probs, the
    old log-probs as exact proximal values at their version, the trainer's current log-probs,
    and the advantage that decides which side of the clip binds."""
    return [
        SampleLogProbs(np.asarray(s["rollout_log_probs"], dtype=np.float64), np.asarray(s[LOG_PROBS_FIELD], dtype=np.float64),
                       theta_logp[index].astype(np.float64), int(s["rollout_version"]), int(s[VERSION_FIELD]), version,
                       float(advantages[index]))
        for index, s in enumerate(samples)
    ]


class Trainer:
    def __init__(self, model_path: Path, learning_rate: float, clip_ratio: float, temperature: float) -> None:
        from transformers import AutoModelForCausalLM

        self.policy = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, local_files_only=True)
        self.policy.train()
        self.optimizer = torch.optim.Adam(self.policy.parameters(), lr=learning_rate)
        self.clip_ratio = clip_ratio
        self.temperature = temperature
        self.version = 0

    def _response_log_probs(self, sequences: torch.Tensor, prompt_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.policy(sequences, use_cache=False).logits[:, prompt_len - 1 : -1].float() / self.temperature
        log_softmax = torch.log_softmax(logits, dim=-1)
        targets = sequences[:, prompt_len:]
        log_probs = log_softmax.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        entropy = -(log_softmax.exp() * log_softmax).sum(-1)
        return log_probs, entropy

    @torch.no_grad()
    def recompute_old_log_probs(self, groups: list[Group]) -> None:
        """The baseline: a forward pass over the whole batch on the trainer, before the update."""
        sequences, _, _, prompt_len = _stack(groups)
        log_probs, entropy = self._response_log_probs(sequences, prompt_len)
        samples = [sample for group in groups for sample in group]
        for index, sample in enumerate(samples):
            sample[LOG_PROBS_FIELD] = log_probs[index].numpy()
            sample[ENTROPY_FIELD] = entropy[index].numpy()
            sample["engine_server_weight_version"] = self.version

    def update(self, groups: list[Group]) -> dict[str, Any]:
        sequences, advantages, rewards, prompt_len = _stack(groups)
        samples = [sample for group in groups for sample in group]
        old_log_probs = torch.from_numpy(np.stack([s[LOG_PROBS_FIELD] for s in samples]))
        started = time.perf_counter()
        log_probs, _ = self._response_log_probs(sequences, prompt_len)
        ratio = (log_probs - old_log_probs).exp()
        clipped = ratio.clamp(1 - self.clip_ratio, 1 + self.clip_ratio)
        loss = -torch.min(ratio * advantages[:, None], clipped * advantages[:, None]).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.version += 1
        with torch.no_grad():
            # verl's pg_clipfrac: tokens whose clipped term is the one the loss takes
            clip_fraction = float(clip_binds(log_probs.detach().numpy(), old_log_probs.numpy(),
                                             advantages[:, None].numpy(), self.clip_ratio).mean())
            ratio_mean = ratio.mean().item()
        update_s = time.perf_counter() - started
        # beside the update, not in its time: what AReaL's loglinear approximation would have used
        approximation = step_metrics(
            proximal_samples(samples, log_probs.detach().numpy(), advantages.numpy(), self.version - 1), self.clip_ratio
        )
        return {
            "loss": loss.item(),
            "reward": rewards.mean().item(),
            "ratio_mean": ratio_mean,
            "clip_fraction": clip_fraction,
            "update_s": update_s,
            **approximation,
        }

    def export_weights(self) -> list[tuple[str, torch.Tensor]]:
        """HF-named tensors, copied so later updates don't change what is in flight."""
        return [(name, param.detach().clone()) for name, param in self.policy.named_parameters()]
