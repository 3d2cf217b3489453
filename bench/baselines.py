"""What the server path is compared against: a trainer's log-prob computation without fused kernels.

Full-vocab logits for every position, scaled by the temperature in place, `log_softmax`, then
a gather of the targets and the entropy of the same distribution. Written to be as lean as a
careful trainer is (in-place where it can), so the comparison is not against a straw man.
"""

from __future__ import annotations

import torch


@torch.inference_mode()
def full_logits_log_probs(
    hidden: torch.Tensor, lm_head_weight: torch.Tensor, targets: torch.Tensor, temperatures: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    logits = (hidden @ lm_head_weight.T).float()
    logits.div_(temperatures.float().unsqueeze(-1))
    log_softmax = torch.log_softmax(logits, dim=-1)
    del logits
    log_probs = log_softmax.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(log_softmax.exp().mul_(log_softmax)).sum(-1)
    return log_probs, entropy
