"""A toy task with a verifiable reward: emit tokens from a small target set.

A random policy hits the set with probability `target_vocab / vocab_size`; a policy-gradient
learner raises that within tens of updates, so progress is visible in minutes on a CPU.
"""

from __future__ import annotations

import torch


class TargetTokenTask:
    def __init__(self, vocab_size: int, target_vocab: int, prompt_len: int, seed: int) -> None:
        if not 0 < target_vocab < vocab_size:
            raise ValueError(f"target_vocab must be in 1..{vocab_size - 1}, got {target_vocab}")
        self.vocab_size = vocab_size
        self.target_vocab = target_vocab
        self.prompt_len = prompt_len
        self.generator = torch.Generator().manual_seed(seed)

    def sample_prompt(self) -> torch.Tensor:
        """Prompt tokens from outside the target set, so the reward measures the response only."""
        return torch.randint(self.target_vocab, self.vocab_size, (self.prompt_len,), generator=self.generator)

    def reward(self, response_ids: torch.Tensor) -> torch.Tensor:
        """Share of response tokens in the target set, per row of `[n, response_len]`."""
        return (response_ids < self.target_vocab).float().mean(dim=-1)
