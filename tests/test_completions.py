"""`/v1/completions` and `/v1/models` on a real uvicorn (127.0.0.1), in vLLM's documented shapes,
against plain transformers (fp32, 1e-5): TRL's `prompt_logprobs` form and lm-eval's legacy
`echo` + `logprobs` form, and 400s that name what is not supported."""

from __future__ import annotations

import shutil

import httpx
import numpy as np
import pytest
import torch

from tests.helpers import reference_model
from tests.test_http_support import local_http_server

TOLERANCE = 1e-5
VOCAB = 512


def _serve(model_path: str):
    return local_http_server(model_path, default_temperature=0.5)


@pytest.fixture(scope="module")
def served(tiny_model):
    with _serve(str(tiny_model)) as server:
        yield server


@pytest.fixture(scope="module")
def reference(tiny_model):
    return reference_model(tiny_model)


@torch.no_grad()
def full_log_softmax(model, ids: list[int], temperature: float) -> torch.Tensor:
    """`[L, V]`: row j is log softmax(logits after x[0..j] / T), plain transformers, one sequence."""
    return torch.log_softmax(model(torch.tensor([ids])).logits[0].float() / temperature, dim=-1)


def complete(url: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json=body, timeout=60)


def test_models_and_health_answer_as_vllm(served, tiny_model):
    models = httpx.get(f"{served.url}/v1/models").json()
    assert models["object"] == "list" and len(models["data"]) == 1
    assert models["data"][0]["id"] == str(tiny_model) and models["data"][0]["object"] == "model"
    assert httpx.get(f"{served.url}/health").status_code == 200


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_prompt_logprobs_as_trl_reads_them(served, reference, tiny_model, temperature):
    rng = np.random.default_rng(int(temperature * 10))
    prompts = [rng.integers(0, VOCAB, size=n).tolist() for n in (2, 17, 130)]
    k = 5
    response = complete(served.url, {"model": str(tiny_model), "prompt": prompts, "max_tokens": 1,
                                     "temperature": temperature, "prompt_logprobs": k})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "text_completion" and body["model"] == str(tiny_model)
    assert body["usage"] == {"prompt_tokens": 149, "completion_tokens": 3, "total_tokens": 152}
    assert body["weight_version"] == 0
    max_diff = 0.0
    for choice, ids in zip(body["choices"], prompts):
        table = full_log_softmax(reference, ids, temperature)
        entries = choice["prompt_logprobs"]
        assert len(entries) == len(ids) and entries[0] is None
        for position in range(1, len(ids)):
            row, actual = table[position - 1], ids[position]
            entry = entries[position]
            values = row.topk(k).values
            ranked = sorted(entry.items(), key=lambda item: item[1]["rank"])[:k]  # as TRL reads them
            got = torch.tensor([v["logprob"] for _, v in ranked])
            own = row[torch.tensor([int(t) for t, _ in ranked])]  # each id's own reference log-prob
            # values, not ids, in order: the tiny model has exact ties, where topk's order is free
            max_diff = max(max_diff, float((got - values).abs().max()), float((got - own).abs().max()))
            assert str(actual) in entry
            assert entry[str(actual)]["rank"] == int((row > row[actual]).sum()) + 1
            max_diff = max(max_diff, abs(entry[str(actual)]["logprob"] - float(row[actual])))
            assert entry[str(actual)]["decoded_token"] == str(actual)  # no tokenizer in this folder
            assert len(entry) == k + (str(actual) not in {t for t, _ in ranked})
            assert all(1 <= v["rank"] <= k for t, v in entry.items() if t != str(actual))
    assert max_diff <= TOLERANCE, max_diff


def test_echo_logprobs_as_lm_eval_reads_them(served, reference):
    ids = list(range(10, 60))
    response = complete(served.url, {"prompt": ids, "max_tokens": 1, "logprobs": 1, "echo": True, "temperature": 0})
    assert response.status_code == 200, response.text
    [choice] = response.json()["choices"]
    table = full_log_softmax(reference, ids, 1.0)  # temperature 0: the raw distribution
    logprobs = choice["logprobs"]
    greedy = int(table[-1].argmax())
    assert logprobs["tokens"] == [str(t) for t in ids] + [str(greedy)]
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    expected = table[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    got = torch.tensor(logprobs["token_logprobs"][1:-1])
    assert float((got - expected).abs().max()) <= TOLERANCE
    assert abs(logprobs["token_logprobs"][-1] - float(table[-1].max())) <= TOLERANCE
    for position in range(1, len(ids)):
        top = logprobs["top_logprobs"][position]
        assert str(ids[position]) in top and str(int(table[position - 1].argmax())) in top and len(top) <= 2
    texts = logprobs["tokens"]
    assert logprobs["text_offset"] == [sum(len(t) for t in texts[:i]) for i in range(len(texts))]
    assert choice["text"] == "".join(texts) and choice["finish_reason"] == "length"


def test_max_tokens_zero_and_a_one_token_prompt(served):
    response = complete(served.url, {"prompt": [[7], [7, 8]], "max_tokens": 0, "prompt_logprobs": 0})
    assert response.status_code == 200, response.text
    first, second = response.json()["choices"]
    assert first["prompt_logprobs"] == [None] and first["text"] == ""
    assert second["prompt_logprobs"][0] is None and list(second["prompt_logprobs"][1]) == ["8"]
    assert response.json()["usage"]["completion_tokens"] == 0


def test_a_sampled_token_is_reproducible_with_a_seed(served):
    body = {"prompt": list(range(30)), "max_tokens": 1, "temperature": 1.5, "seed": 1234, "logprobs": 0}
    tokens = {complete(served.url, body).json()["choices"][0]["logprobs"]["tokens"][0] for _ in range(3)}
    assert len(tokens) == 1


@pytest.mark.parametrize("extra, named", [
    ({"n": 2}, ["n"]),
    ({"stream": True, "logit_bias": {"5": 1.0}, "best_of": 3}, ["best_of", "logit_bias", "stream"]),
    ({"frobnicate": 1, "top_p": 0.5}, ["frobnicate", "top_p"]),
    ({"max_tokens": 16}, ["max_tokens"]),
    ({"max_tokens": None}, ["max_tokens"]),
    ({"temperature": -1.0}, ["temperature"]),
    ({"prompt_logprobs": 5000}, ["prompt_logprobs"]),
    ({"prompt": [1, 2, VOCAB]}, ["prompt"]),
    ({"prompt": "some text"}, ["prompt"]),
    ({"prompt": [True, 2]}, ["prompt"]),
    ({"max_tokens": True}, ["max_tokens"]),
    ({"temperature": True}, ["temperature"]),
    ({"temperature": "0.5"}, ["temperature"]),
])
def test_what_is_not_supported_is_a_400_naming_it(served, extra, named):
    body = {"prompt": [1, 2, 3], "max_tokens": 1, **extra}
    if body["max_tokens"] is None:
        del body["max_tokens"]
    response = complete(served.url, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    for name in named:
        assert name in error["message"] or name in (error.get("field") or ""), error


def test_no_ops_are_accepted_and_another_model_is_a_404(served):
    ok = complete(served.url, {"prompt": [1, 2], "max_tokens": 0, "n": 1, "stream": False, "top_p": 1.0, "user": "u"})
    assert ok.status_code == 200, ok.text
    assert complete(served.url, {"model": "gpt-4", "prompt": [1, 2], "max_tokens": 0}).status_code == 404


def test_with_a_tokenizer_text_prompts_and_decoded_tokens(tiny_model, tmp_path, monkeypatch):
    import threading

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from model_engine_server.http.tokens import TokenText

    encoding_threads: list[str] = []
    encode = TokenText.encode

    def recorded(self, *args, **kwargs):
        encoding_threads.append(threading.current_thread().name)
        return encode(self, *args, **kwargs)

    monkeypatch.setattr(TokenText, "encode", recorded)

    folder = tmp_path / "with_tokenizer"
    shutil.copytree(tiny_model, folder)
    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="w0").save_pretrained(folder)
    with _serve(str(folder)) as server:
        response = complete(server.url, {"prompt": "w5 w9 w200", "max_tokens": 0, "prompt_logprobs": 2})
        assert response.status_code == 200, response.text
        entries = response.json()["choices"][0]["prompt_logprobs"]
        assert len(entries) == 3 and entries[1]["9"]["decoded_token"] == "w9"
        assert all(value["decoded_token"] == f"w{token}" for entry in entries[1:] for token, value in entry.items())
    # a long text takes seconds to tokenize: never on the event loop's thread, which serves every call
    assert encoding_threads and "uvicorn" not in encoding_threads


def test_bad_requests_name_the_prompt_once_and_in_the_clients_terms(served):
    error = complete(served.url, {"prompt": [[1, 2], [3, VOCAB]], "max_tokens": 0}).json()["error"]
    assert error["field"] == "prompt[1]" and error["message"].count("prompt[1]") == 1
    assert "input_ids" not in error["message"] and f"token id {VOCAB} at position 1" in error["message"]
    lone_half = b'{"prompt": ["ok", "a \\udfff b"], "max_tokens": 0}'  # valid JSON; no UTF-8 can carry it
    response = httpx.post(f"{served.url}/v1/completions", content=lone_half,
                          headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["field"] == "prompt[1]"
    assert "surrogate" in response.json()["error"]["message"]


def test_a_prompt_as_long_as_a_batch_is_scored_and_not_continued(served):
    """The server's batch holds 2048 tokens (`local_http_server`): such a prompt can be scored;
    a returned token would make it 2049."""
    prompt = [int(i) for i in np.random.default_rng(3).integers(0, VOCAB, 2048)]
    scored = complete(served.url, {"prompt": prompt, "max_tokens": 0, "prompt_logprobs": 0})
    assert scored.status_code == 200, scored.text
    assert len(scored.json()["choices"][0]["prompt_logprobs"]) == 2048
    continued = complete(served.url, {"prompt": prompt, "max_tokens": 1}).json()["error"]
    assert continued["field"] == "prompt[0]" and "its 2048 tokens and the one returned" in continued["message"]


def test_a_call_larger_than_the_queue_bound_is_served_in_waves(served):
    """Five 2000-token prompts: more than the 8192 tokens the queue holds at once, so some are
    refused `overloaded` at first; they are sent again as the others finish."""
    rng = np.random.default_rng(4)
    prompts = [[int(i) for i in rng.integers(0, VOCAB, 2000)] for _ in range(5)]
    response = complete(served.url, {"prompt": prompts, "max_tokens": 0, "prompt_logprobs": 0})
    assert response.status_code == 200, response.text
    assert [len(c["prompt_logprobs"]) for c in response.json()["choices"]] == [2000] * 5
    alone = complete(served.url, {"prompt": prompts[4], "max_tokens": 0, "prompt_logprobs": 0}).json()
    assert alone["choices"][0]["prompt_logprobs"] == response.json()["choices"][4]["prompt_logprobs"]


def _paired_word_tokenizer(folder):
    """Ids 2i and 2i+1 are `wI` and `▁wI`: SentencePiece-style, each pair decodes alike alone."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {}
    for i in range(VOCAB // 2):
        vocab[f"w{i}"], vocab[f"\u2581w{i}"] = 2 * i, 2 * i + 1
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="w0").save_pretrained(folder)


def never_greedy_prompt(reference, length: int = 7) -> list[int]:
    """Each next token is the pair partner of the model's most likely one (`_paired_word_tokenizer`):
    the same text, never the argmax."""
    ids = [9]
    for _ in range(length - 1):
        ids.append(int(full_log_softmax(reference, ids, 1.0)[-1].argmax()) ^ 1)
    return ids


def test_with_sentencepiece_style_tokens_echo_keeps_spaces_and_top_maps_keep_the_larger(tiny_model, reference, tmp_path):
    folder = tmp_path / "paired"
    shutil.copytree(tiny_model, folder)
    _paired_word_tokenizer(folder)
    ids = never_greedy_prompt(reference)
    table = full_log_softmax(reference, ids, 1.0)
    with _serve(str(folder)) as server:
        text = complete(server.url, {"prompt": "w3 w7 w100", "max_tokens": 0, "logprobs": 0, "echo": True}).json()
        [choice] = text["choices"]
        assert choice["text"] == "w3 w7 w100" and choice["logprobs"]["tokens"] == ["w3", " w7", " w100"]
        assert choice["logprobs"]["text_offset"] == [0, 2, 5]
        scored = complete(server.url, {"prompt": ids, "max_tokens": 0, "logprobs": 5, "echo": True,
                                       "temperature": 0}).json()
    for position in range(1, len(ids)):
        greedy = int(table[position - 1].argmax())
        top = scored["choices"][0]["logprobs"]["top_logprobs"][position]
        assert len(top) < 6  # the actual token and its partner share one key ...
        assert max(top.values()) == pytest.approx(float(table[position - 1, greedy]), abs=TOLERANCE)  # ... the larger
        # lm-eval's greedy test (`tests/test_lm_eval.py` runs its own parser on this)
        assert scored["choices"][0]["logprobs"]["token_logprobs"][position] != max(top.values())
