"""Top-k log-probs from the chunked step, against plain `log_softmax` + `topk` (fp32, 1e-5).

Values are compared in order at 1e-5, and each returned id's own reference log-prob against its
value: the tiny models have exact ties, among which `topk`'s order of ids is unspecified.
"""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
import torch

from clients.http_client import SyncHttpLogProbClient
from model_engine_server.adapter import ModelEngineServerAdapter
from model_engine_server.engines.base import EngineSpec, build_engine
from model_engine_server.errors import InvalidRequest
from model_engine_server.logprobs import LMHead, chunked_scores
from model_engine_server.protocol import MAX_TOP_K, LogProbRequest
from tests.helpers import random_requests, reference_log_probs, reference_model, reference_top_k

TOLERANCE = 1e-5


@pytest.mark.parametrize("chunk_tokens", [1, 7, 64])
@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_top_k_equals_full_log_softmax_topk(chunk_tokens, with_bias):
    generator = torch.Generator().manual_seed(chunk_tokens + 10 * with_bias)
    hidden = torch.randn(50, 16, generator=generator)
    weight = torch.randn(300, 16, generator=generator)
    bias = torch.randn(300, generator=generator) if with_bias else None
    targets = torch.randint(0, 300, (50,), generator=generator)
    temperatures = torch.where(torch.arange(50) % 2 == 0, 0.7, 1.3)
    scores = chunked_scores(hidden, LMHead(weight, bias), targets, temperatures, True, 20, chunk_tokens)
    full = torch.log_softmax(torch.nn.functional.linear(hidden, weight, bias) / temperatures[:, None], dim=-1)
    values, ids = full.topk(20, dim=-1)
    assert scores.top_k_ids is not None and scores.top_k_log_probs is not None
    assert scores.top_k_ids.shape == (50, 20) and scores.top_k_ids.dtype == torch.int64
    assert torch.equal(scores.top_k_ids, ids)
    torch.testing.assert_close(scores.top_k_log_probs, values, atol=TOLERANCE, rtol=0)
    target_log_probs = full.gather(1, targets[:, None])
    torch.testing.assert_close(scores.log_probs, target_log_probs[:, 0], atol=TOLERANCE, rtol=0)
    assert torch.equal(scores.target_ranks, (full > target_log_probs).sum(1) + 1)


def test_top_k_larger_than_the_vocabulary_returns_every_token_sorted():
    hidden, weight = torch.randn(5, 8), torch.randn(12, 8)
    scores = chunked_scores(hidden, LMHead(weight), torch.zeros(5, dtype=torch.long), torch.ones(5), False, 50)
    assert scores.top_k_ids is not None and scores.top_k_log_probs is not None
    assert scores.top_k_ids.shape == (5, 12)
    assert torch.equal(scores.top_k_ids.sort(dim=1).values, torch.arange(12).expand(5, 12))
    assert (scores.top_k_log_probs.diff(dim=1) <= 0).all()
    torch.testing.assert_close(scores.top_k_log_probs.exp().sum(1), torch.ones(5), atol=1e-5, rtol=0)


def test_no_top_k_leaves_the_result_without_it():
    scores = chunked_scores(torch.randn(3, 4), LMHead(torch.randn(9, 4)), torch.zeros(3, dtype=torch.long), torch.ones(3))
    assert scores.top_k_ids is None and scores.top_k_log_probs is None


@pytest.mark.parametrize("bad", [0, -1, MAX_TOP_K + 1])
def test_out_of_range_top_k_is_refused_naming_the_field(bad):
    with pytest.raises(InvalidRequest) as caught:
        LogProbRequest.parse({"input_ids": [1, 2, 3], "response_start": 1, "top_k": bad})
    assert caught.value.field == "top_k" and str(MAX_TOP_K) in str(caught.value)


@pytest.fixture(scope="module")
def engine(tiny_model):
    return build_engine("hf", EngineSpec(model_path=str(tiny_model)))


@pytest.mark.parametrize("temperature", [0.6, 1.3])
def test_hf_engine_top_k_equals_plain_transformers(engine, tiny_model, temperature):
    adapter = ModelEngineServerAdapter(engine, max_tokens_per_micro_batch=1024, logprob_chunk_mb=1)
    base = random_requests(12, engine.info.vocab_size, seed=int(temperature * 10), max_len=300,
                           temperatures=(temperature,), return_entropy=False)
    ks = [None, 1, 5, 20, None, 100]  # mixed in one micro-batch: each gets its own k, or none
    requests = [r.model_copy(update={"top_k": ks[i % len(ks)]}) for i, r in enumerate(base)]
    outputs = adapter.score(requests)
    reference = reference_model(tiny_model)
    for request, output in zip(requests, outputs):
        expected_log_probs, _ = reference_log_probs(reference, request)
        torch.testing.assert_close(torch.from_numpy(output.log_probs), expected_log_probs, atol=TOLERANCE, rtol=0)
        if request.top_k is None:
            assert output.top_k_ids is None and output.top_k_log_probs is None
            continue
        ids, values = reference_top_k(reference, request, request.top_k)
        assert output.top_k_ids.shape == (request.num_response_tokens, request.top_k)
        assert_top_k(output.top_k_ids, output.top_k_log_probs, ids, values, reference, request)
        torch.testing.assert_close(torch.from_numpy(output.top_k_log_probs), values, atol=TOLERANCE, rtol=0)
        full = torch.log_softmax(reference(torch.tensor([request.input_ids])).logits[0] / request.temperature, -1)
        predicting = full[request.response_start - 1 : -1]
        targets = torch.tensor(request.input_ids[request.response_start :])
        expected_ranks = (predicting > predicting.gather(1, targets[:, None])).sum(1) + 1
        assert np.array_equal(output.target_ranks, expected_ranks.numpy())


@torch.no_grad()
def assert_top_k(got_ids, got_values, ids, values, model, request) -> float:
    """Top-k equal to the reference's up to the order of exactly tied tokens; the max difference."""
    got_ids, got_values = torch.from_numpy(np.asarray(got_ids)), torch.from_numpy(np.asarray(got_values))
    assert got_ids.shape == ids.shape and got_ids.dtype == torch.int64
    full = torch.log_softmax(model(torch.tensor([request.input_ids])).logits[0] / request.temperature, -1)
    own = full[request.response_start - 1 : -1].gather(1, got_ids)
    torch.testing.assert_close(got_values, values, atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(own, values, atol=TOLERANCE, rtol=0)
    assert all(len(set(row.tolist())) == row.numel() for row in got_ids)
    return max(float((got_values - values).abs().max()), float((own - values).abs().max()))


class _LogProbsOnlyEngine:
    """An engine with `score_packed` alone (as the verl backend): top_k must be refused."""

    def __init__(self, inner) -> None:
        self.inner, self.info = inner, inner.info

    def score_packed(self, batch, temperatures, want_entropy, chunk_tokens):
        return self.inner.score_packed(batch, temperatures, want_entropy, chunk_tokens)


def test_an_engine_without_top_k_refuses_only_the_requests_that_ask(engine):
    adapter = ModelEngineServerAdapter(_LogProbsOnlyEngine(engine))
    plain = LogProbRequest(input_ids=[1, 2, 3, 4], response_start=2, temperature=1.0)
    asking = plain.model_copy(update={"top_k": 3})
    outcomes = adapter.score([plain, asking])
    assert outcomes[0].log_probs.shape == (2,)
    assert isinstance(outcomes[1], InvalidRequest) and outcomes[1].field == "top_k"
    assert "top-k" in str(outcomes[1])


@pytest.fixture(scope="module")
def served(tiny_model):
    from model_engine_server.config import HttpConfig
    from model_engine_server.http.app import create_app
    from model_engine_server.http.metrics import ServerMetrics
    from model_engine_server.local import build_local_server
    from model_engine_server.scheduler import SchedulerConfig
    from tests.test_http_support import ServerThread

    metrics = ServerMetrics()
    service = build_local_server(EngineSpec(model_path=str(tiny_model)), scheduler=SchedulerConfig(
        max_tokens_per_batch=2048, max_queued_tokens=4096, request_timeout_s=60), observer=metrics.observer)
    with ServerThread(create_app(service, HttpConfig(), metrics, owns_service=True)) as server:
        yield server


@pytest.mark.parametrize("wire_format", ["json", "msgpack"])
def test_top_k_over_http_and_the_python_client(served, tiny_model, wire_format):
    request = LogProbRequest(input_ids=list(range(3, 40)), response_start=10, temperature=0.9, top_k=7)
    client = SyncHttpLogProbClient(served.url, wire=wire_format)
    try:
        [result] = client.score([request])
    finally:
        client.close()
    ids, values = reference_top_k(reference_model(tiny_model), request, 7)
    assert result.top_k_ids.dtype == np.int64 and result.top_k_ids.shape == (27, 7)
    assert_top_k(result.top_k_ids, result.top_k_log_probs, ids, values, reference_model(tiny_model), request)
    assert result.target_ranks.shape == (27,) and result.target_ranks.min() >= 1
    assert result.top_k_ids.flags.writeable and result.top_k_log_probs.flags.writeable  # not views of the body
    torch.testing.assert_close(torch.from_numpy(np.asarray(result.top_k_log_probs)), values, atol=TOLERANCE, rtol=0)


def test_top_k_absent_from_results_that_did_not_ask_and_refused_with_400(served):
    plain = httpx.post(f"{served.url}/v1/logprobs", content=json.dumps(
        {"requests": [{"input_ids": [3, 4, 5], "response_start": 1}]}), headers={"content-type": "application/json"})
    assert plain.status_code == 200 and "top_k_ids" not in plain.json()["results"][0]
    bad = httpx.post(f"{served.url}/v1/logprobs", content=json.dumps(
        {"requests": [{"input_ids": [3, 4, 5], "response_start": 1, "top_k": 5000}]}),
        headers={"content-type": "application/json"})
    assert bad.status_code == 400, bad.text
    assert "top_k" in bad.text


def _vocab_parallel_top_k_rank(rank: int, bounds: list[int], port: int, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=len(bounds) - 1)
    hidden, weight, targets = _sharded_problem()
    head = LMHead(weight[bounds[rank] : bounds[rank + 1]], vocab_start=bounds[rank], group=dist.group.WORLD)
    scores = chunked_scores(hidden, head, targets, torch.full((10,), 0.7), True, 15, 3)
    results[rank] = (scores.top_k_ids, scores.top_k_log_probs, scores.target_ranks, scores.log_probs)
    dist.destroy_process_group()


def _sharded_problem() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(10, 8, generator=generator), torch.randn(41, 8, generator=generator)
    return hidden, weight, torch.randint(0, 41, (10,), generator=generator)


def test_vocab_parallel_top_k_over_gloo_equals_the_unsharded_top_k():
    """Uneven shards (12 and 29 rows, k=15 larger than one shard) merge to the global top-k and
    the exact ranks, on every rank."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_vocab_parallel_top_k_rank, args=([0, 12, 41], port, results), nprocs=2, join=True)
    hidden, weight, targets = _sharded_problem()
    full = torch.log_softmax(hidden @ weight.T / 0.7, dim=-1)
    values, ids = full.topk(15, dim=-1)
    expected_ranks = (full > full.gather(1, targets[:, None])).sum(1) + 1
    for rank in range(2):
        got_ids, got_values, got_ranks, log_probs = results[rank]
        assert torch.equal(got_ids, ids)
        torch.testing.assert_close(got_values, values, atol=TOLERANCE, rtol=0)
        assert torch.equal(got_ranks, expected_ranks)
        torch.testing.assert_close(log_probs, full.gather(1, targets[:, None])[:, 0], atol=TOLERANCE, rtol=0)
