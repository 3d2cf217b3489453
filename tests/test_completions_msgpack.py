"""`/v1/completions` speaks the same msgpack as `/v1/logprobs` (`http/wire.py`, `codec.py`): a msgpack
body gets the JSON answer's content in msgpack, token ids may be the codec's integer arrays, and
what is refused over JSON is refused alike."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from model_engine_server import codec
from tests.test_http_support import local_http_server

MSGPACK = "application/msgpack"
PROMPTS = [[5, 17, 42, 7, 99], [3, 1, 4, 1, 5, 9, 2, 6]]
BODY = {"prompt": PROMPTS, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 3, "logprobs": 2, "echo": True}


@pytest.fixture(scope="module")
def served(tiny_model):
    with local_http_server(str(tiny_model)) as server:
        yield server


def post_msgpack(url: str, body: dict, **headers: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", content=codec.encode(body),
                      headers={"content-type": MSGPACK, **headers}, timeout=60)


def without_call_ids(answer: dict) -> dict:
    return {key: value for key, value in answer.items() if key not in ("id", "created")}


def test_a_msgpack_body_gets_the_json_answer_in_msgpack(served):
    by_json = httpx.post(f"{served.url}/v1/completions", json=BODY, timeout=60)
    by_msgpack = post_msgpack(served.url, BODY)
    assert by_json.status_code == by_msgpack.status_code == 200, by_msgpack.text
    assert by_msgpack.headers["content-type"] == MSGPACK
    answer = codec.decode(by_msgpack.content)
    assert answer["object"] == "text_completion" and len(answer["choices"]) == 2
    assert without_call_ids(answer) == without_call_ids(by_json.json())


def test_accept_json_answers_a_msgpack_body_in_json(served):
    response = post_msgpack(served.url, BODY, accept="application/json")
    assert response.status_code == 200 and response.headers["content-type"].startswith("application/json")
    assert len(response.json()["choices"]) == 2


@pytest.mark.parametrize("prompt", [
    [np.array(PROMPTS[0], dtype=np.int64), np.array(PROMPTS[1], dtype=np.int32)],
    "one",
    "square",
], ids=["list-of-arrays", "one-array", "2d-array"])
def test_token_ids_as_codec_arrays_score_as_lists(served, prompt):
    if prompt == "one":
        prompt, lists = np.array(PROMPTS[1], dtype=np.uint16), [PROMPTS[1]]
    elif prompt == "square":
        prompt, lists = np.array([PROMPTS[0], PROMPTS[0][::-1]], dtype=np.int64), [PROMPTS[0], PROMPTS[0][::-1]]
    else:
        lists = PROMPTS
    by_arrays = post_msgpack(served.url, {**BODY, "prompt": prompt})
    by_lists = post_msgpack(served.url, {**BODY, "prompt": lists})
    assert by_arrays.status_code == 200, by_arrays.text
    assert without_call_ids(codec.decode(by_arrays.content)) == without_call_ids(codec.decode(by_lists.content))


@pytest.mark.parametrize("body, field", [
    ({**BODY, "prompt": np.array([1.0, 2.0], dtype=np.float32)}, "prompt"),
    ({**BODY, "prompt": np.zeros((2, 2, 2), dtype=np.int64)}, "prompt"),
    ({**BODY, "prompt": np.array([], dtype=np.int64)}, "prompt"),
    ({**BODY, "n": 3}, "n"),
])
def test_what_json_refuses_msgpack_refuses_naming_it(served, body, field):
    response = post_msgpack(served.url, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert field in (error.get("field") or "") or field in error["message"], error


def test_a_malformed_msgpack_body_is_a_400(served):
    response = httpx.post(f"{served.url}/v1/completions", content=b"\xc1\xff\x00",
                          headers={"content-type": MSGPACK}, timeout=60)
    assert response.status_code == 400, response.text
