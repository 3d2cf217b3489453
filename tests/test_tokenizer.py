"""`make-tiny-model` writes a tokenizer trained here: `AutoTokenizer` loads it offline, its ids fit the
model, and text prompts on a real uvicorn score exactly as the same prompt sent as token ids."""

from __future__ import annotations

import argparse

import httpx
import pytest
import torch

from model_engine_server.commands import make_tiny_model as command
from model_engine_server.tiny_model import TinyModelShape, make_tiny_model
from model_engine_server.tiny_tokenizer import MIN_VOCAB_SIZE, build_tiny_tokenizer
from tests.helpers import reference_model
from tests.test_http_support import local_http_server

TEXTS = [
    "Question: What colour is the sky on a clear day? Answer: blue",
    "12345 apples,  two spaces\n\nand a new paragraph",
    "don't stop: héllo wörld 🙂 <|endoftext|> end",
]


def make_cli(output_dir, *flags: str) -> int:
    parser = argparse.ArgumentParser()
    command.register(parser.add_subparsers())
    args = parser.parse_args(["make-tiny-model", str(output_dir), *flags])
    return args.func(args)


@pytest.fixture(scope="module")
def model_with_tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer") / "model"
    assert make_cli(folder) == 0
    return folder


def test_the_command_writes_a_tokenizer_auto_tokenizer_loads_offline(model_with_tokenizer):
    from transformers import AutoTokenizer

    assert (model_with_tokenizer / "tokenizer.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(str(model_with_tokenizer), local_files_only=True)
    assert len(tokenizer) == 512  # the whole vocabulary of the default tiny model, and no more
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 1, 1)
    for text in TEXTS:
        ids = tokenizer(text).input_ids
        assert 0 < len(ids) < len(text.encode()) and max(ids) < 512
        assert tokenizer.decode(ids, skip_special_tokens=False) == text


@pytest.mark.parametrize("arch", ["qwen2", "llama", "qwen3"])
def test_auto_tokenizer_and_the_saved_tokenizer_json_give_the_same_ids(tmp_path, arch):
    """transformers 5 rebuilds a qwen2 folder's tokenizer as Qwen2Tokenizer from the vocabulary and
    merges; the other types load tokenizer.json as saved. Both must encode alike."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    folder = make_tiny_model(tmp_path / arch, TinyModelShape(arch=arch, vocab_size=300), tokenizer=True)
    auto = AutoTokenizer.from_pretrained(str(folder))
    saved = PreTrainedTokenizerFast.from_pretrained(str(folder))
    assert len(auto) == len(saved) <= 300
    for text in TEXTS:
        assert auto(text).input_ids == saved(text).input_ids


def test_the_same_vocabulary_trains_the_same_tokenizer():
    first, second = build_tiny_tokenizer(400), build_tiny_tokenizer(400)
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()
    assert len(first) == 400


def test_a_vocabulary_too_small_for_the_bytes_gets_no_tokenizer(tmp_path):
    with pytest.raises(ValueError, match=str(MIN_VOCAB_SIZE)):
        build_tiny_tokenizer(MIN_VOCAB_SIZE - 1)
    assert make_cli(tmp_path / "small", "--vocab-size", "100") == 0
    assert not (tmp_path / "small" / "tokenizer.json").exists()
    assert make_cli(tmp_path / "asked", "--vocab-size", "100", "--tokenizer") == 2
    assert make_cli(tmp_path / "off", "--no-tokenizer") == 0
    assert not (tmp_path / "off" / "tokenizer.json").exists()


@pytest.fixture(scope="module")
def served(model_with_tokenizer):
    with local_http_server(str(model_with_tokenizer)) as server:
        yield server


def complete(url: str, body: dict) -> dict:
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def test_a_text_prompt_scores_as_its_token_ids(served, model_with_tokenizer):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_with_tokenizer))
    ids = [tokenizer(text).input_ids for text in TEXTS]
    body = {"max_tokens": 0, "prompt_logprobs": 3, "temperature": 0.8}
    by_text = complete(served.url, {**body, "prompt": TEXTS})["choices"]
    by_ids = complete(served.url, {**body, "prompt": ids})["choices"]
    assert [c["prompt_logprobs"] for c in by_text] == [c["prompt_logprobs"] for c in by_ids]
    model = reference_model(model_with_tokenizer)
    for choice, prompt in zip(by_text, ids):
        entries = choice["prompt_logprobs"]
        assert len(entries) == len(prompt) and entries[0] is None
        with torch.no_grad():
            table = torch.log_softmax(model(torch.tensor([prompt])).logits[0] / 0.8, dim=-1)
        for position, entry in enumerate(entries[1:], start=1):
            actual = prompt[position]
            assert abs(entry[str(actual)]["logprob"] - float(table[position - 1, actual])) <= 1e-5
            for token, value in entry.items():
                assert value["decoded_token"] == tokenizer.decode([int(token)])


def test_echoed_tokens_are_the_tokenizer_s_text(served, model_with_tokenizer):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_with_tokenizer))
    text = TEXTS[0]
    ids = tokenizer(text).input_ids
    [choice] = complete(served.url, {"prompt": text, "max_tokens": 1, "logprobs": 1, "echo": True,
                                     "temperature": 0})["choices"]
    [by_ids] = complete(served.url, {"prompt": ids, "max_tokens": 1, "logprobs": 1, "echo": True,
                                     "temperature": 0})["choices"]
    assert choice["logprobs"] == by_ids["logprobs"]
    tokens = choice["logprobs"]["tokens"]
    assert tokens[:-1] == [tokenizer.decode([i]) for i in ids] and "".join(tokens[:-1]) == text
    assert choice["text"] == "".join(tokens)
    with torch.no_grad():
        logits = reference_model(model_with_tokenizer)(torch.tensor([ids])).logits[0]
    greedy = int(logits[-1].argmax())
    assert tokens[-1] == tokenizer.decode([greedy])


def test_echo_of_multibyte_text_is_the_text_and_offsets_index_it(served, model_with_tokenizer):
    """Byte-level tokens that each hold part of a character: decoded alone they are U+FFFD, in
    context the character comes whole at its last token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_with_tokenizer))
    text = TEXTS[2]
    ids = tokenizer(text).input_ids
    assert "\ufffd" in "".join(tokenizer.decode([i]) for i in ids)  # the case this is about
    [choice] = complete(served.url, {"prompt": text, "max_tokens": 0, "logprobs": 0, "echo": True})["choices"]
    tokens, offsets = choice["logprobs"]["tokens"], choice["logprobs"]["text_offset"]
    assert choice["text"] == text == "".join(tokens) and len(tokens) == len(ids)
    assert all(text[start:start + len(token)] == token for start, token in zip(offsets, tokens))
    assert "\ufffd" not in text and not any("\ufffd" in token for token in tokens)


@pytest.mark.parametrize("flags,reason", [
    (["--num-heads", "3"], "not a multiple of the 3 heads"),
    (["--num-heads", "4", "--num-kv-heads", "3"], "not a multiple of the 3 key/value heads"),
    (["--hidden-size", "24", "--num-heads", "8", "--num-kv-heads", "2"], "must be even"),
])
def test_a_shape_transformers_cannot_run_is_refused_and_nothing_is_written(tmp_path, capsys, flags, reason):
    # once written (exit 0) and only failing at the first forward
    assert make_cli(tmp_path / "bad", *flags) == 2
    assert reason in capsys.readouterr().err and not (tmp_path / "bad").exists()
