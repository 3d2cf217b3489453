"""lm-evaluation-harness's real `local-completions` model, run through `lm_eval.simple_evaluate`, scores a
local multiple-choice task (tests/fixtures/lm_eval, nothing downloaded) against our server on a real
uvicorn: every choice's log-likelihood equals a plain transformers forward + log_softmax (1e-4).

lm-eval tokenizes on its side (`tokenizer_backend=huggingface`, the checkpoint folder's tokenizer
that `make-tiny-model` writes) and sends the legacy form `{"prompt": [ids], "echo": true,
"logprobs": 1, "max_tokens": 1, "temperature": 0}`; it sums `token_logprobs[ctxlen:-1]`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval")

import torch  # noqa: E402
import yaml  # noqa: E402

from model_engine_server.tiny_model import make_tiny_model  # noqa: E402
from tests.helpers import reference_model  # noqa: E402
from tests.test_http_support import local_http_server  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "lm_eval"
TOLERANCE = 1e-4  # summed over a choice's tokens, as the issue states it
CHOICES = 3 + 4 + 2 + 3 + 4  # tiny_mc.jsonl


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("lm_eval") / "model", seed=3, tokenizer=True)


@pytest.fixture(scope="module")
def served(model_folder):
    # default_temperature 0.5: lm-eval's temperature 0 must score the raw distribution, not this one
    with local_http_server(str(model_folder), default_temperature=0.5) as server:
        yield server


def task_folder(tmp_path: Path) -> Path:
    """The fixture task with absolute paths: its JSONL, and a datasets cache inside tmp_path."""
    config = yaml.safe_load((FIXTURES / "tiny_mc.yaml").read_text())
    config["dataset_kwargs"] = {"data_files": {"test": str(FIXTURES / "tiny_mc.jsonl")},
                                "cache_dir": str(tmp_path / "hf-datasets")}
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "tiny_mc.yaml").write_text(yaml.safe_dump(config))
    return folder


@torch.no_grad()
def reference_log_likelihood(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """log P(continuation | context): one forward of context + continuation, log_softmax, summed over
    the continuation's tokens; and whether each of them is its position's argmax (lm-eval's
    `is_greedy`). Tokenized as two pieces, which must be how the whole text encodes."""
    context_ids = tokenizer(context, add_special_tokens=False).input_ids
    continuation_ids = tokenizer(continuation, add_special_tokens=False).input_ids
    ids = context_ids + continuation_ids
    assert ids == tokenizer(context + continuation, add_special_tokens=False).input_ids
    log_probs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    positions = torch.arange(len(context_ids) - 1, len(ids) - 1)
    targets = torch.tensor(continuation_ids)
    greedy = bool((log_probs[positions].argmax(dim=-1) == targets).all())
    return float(log_probs[positions, targets].sum()), greedy


def request_pairs(sample: dict) -> list[tuple[str, str]]:
    """A logged sample's (context, continuation) per choice: tuples in memory, `arg_0`/`arg_1`
    maps once written as JSON."""
    arguments = sample["arguments"]
    if isinstance(arguments, dict):
        return [(a["arg_0"], a["arg_1"]) for a in arguments.values()]
    return [(context, continuation) for context, continuation in arguments]


def test_lm_eval_local_completions_log_likelihoods_match_transformers(served, model_folder, tmp_path):
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={"base_url": f"{served.url}/v1/completions", "model": str(model_folder),
                    "tokenizer_backend": "huggingface", "tokenizer": str(model_folder),
                    "num_concurrent": 1, "max_retries": 1},
        tasks=["tiny_mc"],
        task_manager=TaskManager(include_path=str(task_folder(tmp_path)), include_defaults=False),
        batch_size=4,
        log_samples=True,
        bootstrap_iters=0,
    )
    samples = results["samples"]["tiny_mc"]
    assert len(samples) == 5
    model = reference_model(model_folder)
    tokenizer = AutoTokenizer.from_pretrained(str(model_folder))
    scored = 0
    for sample in samples:
        assert len(sample["resps"]) == len(sample["doc"]["choices"])
        for (context, continuation), [(log_likelihood, is_greedy)] in zip(request_pairs(sample), sample["resps"]):
            assert continuation in {" " + choice for choice in sample["doc"]["choices"]}
            expected, greedy = reference_log_likelihood(model, tokenizer, context, continuation)
            assert abs(float(log_likelihood) - expected) <= TOLERANCE, (context, continuation)
            assert is_greedy == greedy, (context, continuation)
            scored += 1
    assert scored == CHOICES
    assert 0.0 <= results["results"]["tiny_mc"]["acc,none"] <= 1.0


def test_lm_evals_own_parser_sees_a_non_greedy_continuation_whose_text_the_argmax_shares(tiny_model, tmp_path):
    """Tokens that decode alike (SentencePiece `wI` / `\u2581wI`): `top_logprobs` keyed by text must keep
    the argmax's larger value, or lm-eval's `is_greedy` reads a non-greedy continuation as greedy."""
    import shutil

    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from tests.test_completions import _paired_word_tokenizer, never_greedy_prompt

    folder = tmp_path / "paired"
    shutil.copytree(tiny_model, folder)
    _paired_word_tokenizer(folder)
    ids = never_greedy_prompt(reference_model(tiny_model))
    with local_http_server(str(folder)) as server:
        import httpx

        body = {"prompt": ids, "max_tokens": 1, "logprobs": 1, "echo": True, "temperature": 0}  # lm-eval's form
        answer = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()
    [(_, is_greedy)] = LocalCompletionsAPI.parse_logprobs(answer, ctxlens=[1])
    assert is_greedy is False
