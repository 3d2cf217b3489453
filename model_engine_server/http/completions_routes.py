"""`POST /v1/completions` and `GET /v1/models`: the scoring subset of vLLM's OpenAI-compatible API,
so TRL's `VLLMClient.get_sequence_logprobs`, verl's teacher loop and lm-eval's `local-completions`
score against this server unchanged.

Each prompt `x[0..L-1]` becomes one `LogProbRequest` with `response_start = 1` and `top_k = K`,
sent through the same service (scheduler, token budget, pause, sessions) as `/v1/logprobs`. Row
`j < L-1` of its result is the distribution after `x[0..j]`, scoring `x[j+1]`. For `max_tokens: 1`
(and a one-token prompt) the request is `x + [0]`: its last row (the appended 0 is never reported)
is the distribution after the whole prompt, the one the returned token comes from; so a prompt at
the model's maximum length can be scored (`max_tokens: 0`) but not continued. One forward per
prompt. A call larger than the server's queue bound is admitted in waves: prompts refused
`overloaded` are sent again once the call's others are done, as long as each wave scores some.

- `prompt_logprobs: k` -> `choices[i].prompt_logprobs` = `[null, {"<id>": {"logprob", "rank",
  "decoded_token"}}, ...]`: the top-k (ranks 1..k) plus the actual token with its exact rank,
  as vLLM reports it, except on exact ties: here 1 + the tokens strictly more likely (counted in
  the chunked pass), where vLLM counts every token at least as likely, the target included.
  They differ only when the target's logit ties another's, which bf16 makes common.
- `echo` + `logprobs: k` -> the legacy `choices[i].logprobs` (`tokens`, `token_logprobs` with the
  first `null`, `top_logprobs` maps token text -> log-prob with the actual token added, as vLLM,
  `text_offset`); with `max_tokens: 1` the returned token comes last, as lm-eval reads it.
- `temperature`: > 0 applies to every returned log-prob; 0 (or unset: OpenAI's default 1) scores
  the raw distribution, T = 1, never a division by zero.
- `max_tokens: 1`: at temperature 0 the argmax; above, a sample (`seed`: reproducible) from the
  last position's K most likely tokens, renormalised, K = max(20, the asked k) capped at the
  vocabulary: exact when the vocabulary has at most K tokens, otherwise a top-K sample (the
  server computes top-k, never a full row of probabilities).
- Token text: the checkpoint tokenizer's decoding when the folder has one, else the id in decimal
  (`tokens.TokenText`). `tokens`, `text` and `text_offset` decode in context (each token's share
  of the text, so they join into the text and the offsets index it); `decoded_token` and the
  keys of `top_logprobs` name one token each and are its own decoding. Where two tokens decode to
  the same key, the map keeps the larger log-prob (lm-eval's `is_greedy` compares with the max).
- Every choice carries `weight_version` (the weights that scored it); the response's own
  `weight_version` is the oldest of them. Log-probs below -9999 are sent as -9999.0, as vLLM.
- Bodies: JSON, or msgpack as on `/v1/logprobs` (`wire.py`: a msgpack request gets a msgpack
  answer unless `accept` asks for JSON; token-id prompts may be the codec's integer arrays).
"""

from __future__ import annotations

import asyncio
import math
import secrets
import time
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from model_engine_server.errors import InvalidRequest, ModelEngineError, Overloaded
from model_engine_server.http.completions_schema import CompletionsBody, parse_completions_body
from model_engine_server.http.errors import error_response
from model_engine_server.http.routes import (
    ERRORS,
    INT64_MAX,
    _check_content_type,
    _schema_body,
    _wants_msgpack,
    read_body,
    while_connected,
)
from model_engine_server.http.schemas import ErrorResponse
from model_engine_server.http.tokens import TokenText
from model_engine_server.http.wire import JSON, JSON_TYPES, MSGPACK, MSGPACK_TYPES, decode_body, encode_body
from model_engine_server.protocol import MAX_TOP_K, LogProbRequest, LogProbResult

MIN_LOGPROB = -9999.0  # vLLM's floor for -inf in JSON
SAMPLING_TOP_K = 20

completions_router = APIRouter()


def _logprob(value: float) -> float | None:
    """A log-prob as JSON carries it: -inf as vLLM's floor, NaN (never expected) as null."""
    number = float(value)
    return None if math.isnan(number) else max(number, MIN_LOGPROB)


class ScoredPrompt:
    """One prompt's result, read by position: `top(j, k)` is the distribution after `x[0..j]`."""

    def __init__(self, ids: list[int], result: LogProbResult) -> None:
        assert result.top_k_ids is not None and result.top_k_log_probs is not None and result.target_ranks is not None
        self.ids, self.result = ids, result
        self.top_ids, self.top_log_probs, self.ranks = result.top_k_ids, result.top_k_log_probs, result.target_ranks

    def top(self, row: int, k: int) -> list[tuple[int, float]]:
        return [(int(i), float(v)) for i, v in zip(self.top_ids[row, :k], self.top_log_probs[row, :k])]


def _prompts(body: CompletionsBody, text: TokenText) -> list[list[int]]:
    prompt = body.prompt
    if isinstance(prompt, str):
        return [text.encode(prompt, "prompt")]
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]  # type: ignore[arg-type]
    return [text.encode(p, f"prompt[{i}]") if isinstance(p, str) else list(p) for i, p in enumerate(prompt)]


def _scoring_k(body: CompletionsBody) -> int:
    """K: the largest k any part of the answer reads (at least 1: the ranks come with top-k)."""
    k = max(body.prompt_logprobs or 0, body.logprobs or 0, 1)
    if body.max_tokens == 1 and (body.temperature is None or body.temperature > 0):
        k = max(k, SAMPLING_TOP_K)
    return min(k, MAX_TOP_K)


def _temperature(body: CompletionsBody) -> float:
    return 1.0 if body.temperature is None or body.temperature == 0 else float(body.temperature)


def _next_token(scored: ScoredPrompt, body: CompletionsBody, k: int) -> tuple[int, float, int]:
    """(id, log-prob, rank) of the one returned token, from the last row's top-k."""
    candidates = scored.top(len(scored.ids) - 1, k)
    if body.temperature == 0:
        return candidates[0][0], candidates[0][1], 1
    log_probs = np.array([v for _, v in candidates], dtype=np.float64)
    probs = np.exp(log_probs - log_probs.max())
    if not np.isfinite(probs).all() or not probs.sum() > 0:  # a temperature so small 1/T overflowed
        return candidates[0][0], candidates[0][1], 1
    seed = None if body.seed is None else body.seed % (1 << 64)  # any JSON integer, as a valid numpy seed
    choice = int(np.random.default_rng(seed).choice(len(candidates), p=probs / probs.sum()))
    return candidates[choice][0], candidates[choice][1], choice + 1


def _prompt_logprobs(scored: ScoredPrompt, k: int, text: TokenText) -> list[dict[str, Any] | None]:
    entries: list[dict[str, Any] | None] = [None]
    for position in range(1, len(scored.ids)):
        row, actual = position - 1, scored.ids[position]
        entry = {str(actual): {"logprob": _logprob(scored.result.log_probs[row]), "rank": int(scored.ranks[row]),
                               "decoded_token": text.decode(actual)}}
        for rank, (token, value) in enumerate(scored.top(row, k), start=1):
            entry.setdefault(str(token), {"logprob": _logprob(value), "rank": rank, "decoded_token": text.decode(token)})
        entries.append(entry)
    return entries


def _legacy_logprobs(scored: ScoredPrompt, body: CompletionsBody, k: int, text: TokenText,
                     generated: tuple[int, float, int] | None, pieces: list[str]) -> dict[str, Any]:
    """OpenAI's legacy `logprobs` object over the echoed prompt (when `echo`) and the returned
    token; `pieces`: the text of the prompt's tokens and then of the returned one, in context."""
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float | None] | None] = []
    if body.echo:
        for position, token in enumerate(scored.ids):
            tokens.append(pieces[position])
            if position == 0:
                token_logprobs.append(None)
                top_logprobs.append(None)
                continue
            row = position - 1
            token_logprobs.append(_logprob(scored.result.log_probs[row]))
            top_logprobs.append(_top_map(token, token_logprobs[-1], scored.top(row, k), text))
    if generated is not None:
        token, value, _ = generated
        tokens.append(pieces[-1])
        token_logprobs.append(_logprob(value))
        top_logprobs.append(_top_map(token, _logprob(value), scored.top(len(scored.ids) - 1, k), text))
    start = 0 if body.echo else sum(len(piece) for piece in pieces[: len(scored.ids)])
    offsets = list(np.cumsum([start] + [len(t) for t in tokens[:-1]]).tolist()) if tokens else []
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}


def _top_map(actual: int, actual_value: float | None, top: list[tuple[int, float]], text: TokenText) -> dict[str, float | None]:
    """Token text -> log-prob, the actual token's included; of tokens sharing a text, the larger."""
    entry: dict[str, float | None] = {text.decode(actual): actual_value}
    for token, value in top:
        key, value_here = text.decode(token), _logprob(value)
        held = entry.get(key)
        if key not in entry or (value_here is not None and (held is None or value_here > held)):
            entry[key] = value_here
    return entry


def _choice(index: int, scored: ScoredPrompt, body: CompletionsBody, text: TokenText) -> dict[str, Any]:
    generated = _next_token(scored, body, _scoring_k(body)) if body.max_tokens == 1 else None
    pieces = text.pieces(scored.ids + ([generated[0]] if generated is not None else []))
    completion = pieces[-1] if generated is not None else ""
    prompt_text = "".join(pieces[: len(scored.ids)]) if body.echo else ""
    choice: dict[str, Any] = {
        "index": index,
        "text": prompt_text + completion,
        "logprobs": None,
        "finish_reason": "length",
        "stop_reason": None,
        "prompt_logprobs": None,
        "weight_version": scored.result.weight_version,
    }
    if body.logprobs is not None:
        choice["logprobs"] = _legacy_logprobs(scored, body, body.logprobs, text, generated, pieces)
    if body.prompt_logprobs is not None:
        choice["prompt_logprobs"] = _prompt_logprobs(scored, body.prompt_logprobs, text)
    return choice


def _request_for(ids: list[int], body: CompletionsBody) -> LogProbRequest:
    """Scores `x[1..L-1]`; with the row after the whole prompt too (`x + [0]`) when a token is
    returned, or when there is no `x[1]` to score."""
    continued = body.max_tokens == 1 or len(ids) == 1
    return LogProbRequest(input_ids=ids + [0] if continued else ids, response_start=1,
                          temperature=_temperature(body), top_k=_scoring_k(body))


async def _score_in_waves(service: Any, requests: list[LogProbRequest]) -> list[LogProbResult | ModelEngineError]:
    """Every prompt's outcome. OpenAI has no per-choice errors, so a call is answered whole: the
    prompts a full queue refused are sent again once the others are done, while each wave
    scores some (a call larger than the queue bound is then served, not refused forever)."""
    outcomes: list[LogProbResult | ModelEngineError] = [Overloaded("not sent")] * len(requests)
    waiting = list(range(len(requests)))
    while waiting:
        answers = await service.score([requests[i] for i in waiting])
        for index, answer in zip(waiting, answers):
            outcomes[index] = answer
        refused = [index for index, answer in zip(waiting, answers) if isinstance(answer, Overloaded)]
        if len(refused) == len(waiting):  # nothing got in: the server is busy with others
            break
        waiting = refused
    return outcomes


@completions_router.post("/v1/completions", summary="OpenAI/vLLM completions, scoring subset (max_tokens 0 or 1)",
                         response_model=None,
                         responses={200: {"content": {MSGPACK: {}}}, **ERRORS, 404: {"model": ErrorResponse}},
                         openapi_extra=_schema_body("CompletionsBody", (JSON, MSGPACK)))
async def completions(request: Request) -> Response:
    state = request.app.state
    _check_content_type(request, MSGPACK_TYPES | JSON_TYPES)
    payload = decode_body(await read_body(request, state.max_body_bytes), request.headers.get("content-type"))
    body = parse_completions_body(_array_prompts_as_lists(payload))
    if body.model is not None and body.model != state.model_name:
        return JSONResponse({"error": {"code": "not_found", "message": f"the model {body.model!r} is not served here; "
                                       f"this server serves {state.model_name!r}", "field": "model"}}, status_code=404)
    text: TokenText = state.token_text
    count = len(body.prompt) if isinstance(body.prompt, list) and not isinstance(body.prompt[0], int) else 1
    if count > state.max_requests_per_call:  # before any prompt is tokenized
        raise InvalidRequest(f"{count} prompts in one call; the limit is {state.max_requests_per_call}", "prompt")
    prompts = await asyncio.to_thread(_prompts, body, text)  # tokenizing long texts: off the loop as well
    for index, ids in enumerate(prompts):
        if min(ids) < 0 or max(ids) > INT64_MAX:  # the scheduler checks the vocabulary; this, the wire
            raise InvalidRequest("token ids must be >= 0 and fit in 64 bits", f"prompt[{index}]")
    requests = [_request_for(ids, body) for ids in prompts]
    state.scoring_in_progress += 1
    try:
        outcomes = await while_connected(request, _score_in_waves(state.service, requests))
    finally:
        state.scoring_in_progress -= 1
    for index, outcome in enumerate(outcomes):
        if isinstance(outcome, ModelEngineError):  # OpenAI has no per-choice errors: the call fails
            if type(outcome) is InvalidRequest:
                outcome = _prompt_error(outcome, index, prompts[index], requests[index])
            return error_response(outcome, state.retry_after_s)
    scored = [ScoredPrompt(ids, outcome) for ids, outcome in zip(prompts, outcomes)]
    # decoding every token of long prompts is CPU work: off the loop that serves other calls
    choices = await asyncio.to_thread(lambda: [_choice(index, item, body, text) for index, item in enumerate(scored)])
    prompt_tokens = sum(len(ids) for ids in prompts)
    answer = {
        "id": f"cmpl-{secrets.token_hex(16)}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": state.model_name,
        "choices": choices,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": body.max_tokens * len(prompts),
                  "total_tokens": prompt_tokens + body.max_tokens * len(prompts)},
        "weight_version": min(item.result.weight_version for item in scored),
    }
    if _wants_msgpack(request):
        return Response(encode_body(answer, as_msgpack=True), media_type=MSGPACK)
    return JSONResponse(answer)


def _prompt_error(error: InvalidRequest, index: int, ids: list[int], request: LogProbRequest) -> InvalidRequest:
    """The scheduler's refusal, told in the client's terms: its prompt, its token count."""
    where = f"prompt[{index}]"
    if error.field != "input_ids":
        return error.within(where)
    added = len(request.input_ids) - len(ids)
    counted = f" (its {len(ids)} tokens and the one returned)" if added else ""
    return InvalidRequest(f"{error.reason}{counted}", where)


def _array_prompts_as_lists(payload: Any) -> Any:
    """A msgpack body's token ids may be the codec's 1-D integer arrays (one prompt, a list of
    them, or one 2-D array of equal-length prompts): as lists, they validate like JSON ones.
    Any other array is left as it is, for validation to refuse naming `prompt`."""
    if not isinstance(payload, dict):
        return payload
    prompt = payload.get("prompt")
    if _is_id_array(prompt, (1, 2)):
        return {**payload, "prompt": prompt.tolist()}
    if isinstance(prompt, list) and prompt and all(_is_id_array(item, (1,)) for item in prompt):
        return {**payload, "prompt": [item.tolist() for item in prompt]}
    return payload


def _is_id_array(value: Any, dims: tuple[int, ...]) -> bool:
    return isinstance(value, np.ndarray) and value.dtype.kind in "iu" and value.ndim in dims


@completions_router.get("/v1/models", summary="The served model, in OpenAI's list shape")
async def models(request: Request) -> JSONResponse:
    state = request.app.state
    return JSONResponse({"object": "list", "data": [{
        "id": state.model_name, "object": "model", "created": state.created, "owned_by": "model-engine-server",
        "root": state.model_root, "parent": None, "permission": [],
    }]})
