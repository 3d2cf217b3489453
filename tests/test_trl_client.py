"""TRL's own `VLLMClient.get_sequence_logprobs` (trl 1.16, no vLLM) against our `/v1/completions`.

Only the constructor's `is_vllm_available` check is bypassed (it guards imports for NCCL weight
sync, which scoring never uses); every HTTP call is TRL's code. fp32, 1e-5, two temperatures.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers import reference_model
from tests.test_completions import full_log_softmax, served  # noqa: F401  (the module's server fixture)

vllm_client = pytest.importorskip("trl.generation.vllm_client")
TOLERANCE = 1e-5


@pytest.fixture
def client(served, monkeypatch):  # noqa: F811
    monkeypatch.setattr(vllm_client, "is_vllm_available", lambda *args, **kwargs: True)
    return vllm_client.VLLMClient(base_url=served.url)


@pytest.mark.parametrize("temperature", [0.8, 1.0])
def test_trl_get_sequence_logprobs_equals_transformers(client, tiny_model, temperature):
    assert client.model == str(tiny_model)  # read from /v1/models after /health
    rng = np.random.default_rng(7)
    sequences = [rng.integers(0, 512, size=n).tolist() for n in (12, 40, 75)]
    prompt_lengths = [3, 20, 1]
    k = 8
    out = client.get_sequence_logprobs(sequences, prompt_lengths, top_logprobs=k, temperature=temperature)
    reference = reference_model(tiny_model)
    max_diff = 0.0
    for index, (ids, start) in enumerate(zip(sequences, prompt_lengths)):
        table = full_log_softmax(reference, ids, temperature)[start - 1 : -1]  # rows predicting ids[start:]
        top = torch.tensor(out["logprobs"][index])
        top_ids = torch.tensor(out["logprob_token_ids"][index])
        assert top.shape == (len(ids) - start, k)
        max_diff = max(max_diff, float((top - table.topk(k).values).abs().max()))
        max_diff = max(max_diff, float((table.gather(1, top_ids) - top).abs().max()))
        actual = torch.tensor(out["actual_logprobs"][index])[:, 0]
        expected = table.gather(1, torch.tensor(ids[start:])[:, None])[:, 0]
        # TRL keeps the actual token's log-prob when vLLM sends it (always, with its rank)
        assert torch.isfinite(actual).all()
        max_diff = max(max_diff, float((actual - expected).abs().max()))
        assert out["actual_token_ids"][index] == [[t] for t in ids[start:]]
    assert max_diff <= TOLERANCE, max_diff
