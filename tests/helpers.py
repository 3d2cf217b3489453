"""Independent references the tests compare against: plain transformers, one sequence at a time."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from model_engine_server.protocol import LogProbRequest


def reference_model(path: Path | str, attn: str = "eager") -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn).eval()


@torch.no_grad()
def reference_log_probs(model: torch.nn.Module, request: LogProbRequest) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-vocab `log_softmax(logits / T)` of one sequence alone, no packing, no chunking."""
    logits = model(torch.tensor([request.input_ids])).logits[0].float() / request.temperature
    log_softmax = torch.log_softmax(logits, dim=-1)
    predicting = log_softmax[request.response_start - 1 : -1]
    targets = torch.tensor(request.input_ids[request.response_start :])
    log_probs = predicting.gather(1, targets[:, None])[:, 0]
    entropy = -(predicting.exp() * predicting).sum(-1)
    return log_probs, entropy


def random_requests(
    count: int, vocab_size: int, seed: int = 0, min_len: int = 2, max_len: int = 400,
    temperatures: tuple[float, ...] = (0.6, 1.0, 1.3), return_entropy: bool = True,
) -> list[LogProbRequest]:
    rng = random.Random(seed)
    requests = []
    for index in range(count):
        length = rng.randint(min_len, max_len)
        ids = [rng.randrange(vocab_size) for _ in range(length)]
        requests.append(
            LogProbRequest(
                request_id=f"r{seed}-{index}",
                input_ids=ids,
                response_start=rng.randint(1, length - 1),
                temperature=temperatures[index % len(temperatures)],
                return_entropy=return_entropy,
            )
        )
    return requests


@torch.no_grad()
def reference_top_k(model: torch.nn.Module, request: LogProbRequest, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `k` most likely tokens `[response_len, k]` and their log-probs, from the same full-vocab
    `log_softmax(logits / T)` as `reference_log_probs` and `torch.topk`."""
    logits = model(torch.tensor([request.input_ids])).logits[0].float() / request.temperature
    predicting = torch.log_softmax(logits, dim=-1)[request.response_start - 1 : -1]
    values, ids = predicting.topk(min(k, predicting.shape[-1]), dim=-1)
    return ids, values


def assert_matches_reference(model_path: Path | str, requests: list[LogProbRequest], outcomes: list) -> None:
    """Every outcome is a result whose log-probs and entropy equal `reference_log_probs` within 1e-5."""
    from model_engine_server.protocol import LogProbResult

    reference = reference_model(model_path)
    for request, outcome in zip(requests, outcomes, strict=True):
        assert isinstance(outcome, LogProbResult), outcome
        expected, expected_entropy = reference_log_probs(reference, request)
        torch.testing.assert_close(torch.from_numpy(outcome.log_probs.copy()), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.from_numpy(outcome.entropy.copy()), expected_entropy, atol=1e-5, rtol=0)
