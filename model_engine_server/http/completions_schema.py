"""The body of `POST /v1/completions` that this server answers: the scoring subset of vLLM's
OpenAI-compatible API, and nothing it would have to pretend to do.

Fields are vLLM's names and defaults. A field this server cannot honour is never ignored: a
known field set to anything but its no-op value (`n: 2`, `stream: true`, `logit_bias: {...}`),
and any field this model does not know at all, is a 400 naming every such field at once.
`max_tokens` must be said (0 or 1): OpenAI's default of 16 generated tokens is not something
a scoring server can give, and answering 1 token instead would change what the client asked.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, ValidationError

from model_engine_server.errors import InvalidRequest
from model_engine_server.protocol import MAX_TOP_K
from model_engine_server.temperature import temperature_problem

# known fields, each with the values under which it changes nothing here
NO_OP_VALUES: dict[str, tuple[Any, ...]] = {
    "n": (None, 1),
    "best_of": (None, 1),
    "stream": (None, False),
    "stream_options": (None,),
    "logit_bias": (None, {}),
    "stop": (None, [], ""),
    "stop_token_ids": (None, []),
    "suffix": (None, ""),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "repetition_penalty": (None, 1, 1.0),
    "top_p": (None, 1, 1.0),
    "top_k": (None, 0, -1),
    "min_p": (None, 0, 0.0),
    "min_tokens": (None, 0),
    "ignore_eos": (None, False),
    "use_beam_search": (None, False),
    "response_format": (None,),
    "guided_json": (None,),
    "guided_regex": (None,),
    "guided_choice": (None,),
    "guided_grammar": (None,),
}
IGNORED_FIELDS = frozenset({"user"})  # OpenAI's end-user id: metadata, changes no number


class CompletionsBody(BaseModel):
    """What `/v1/completions` reads; every other field lands in `model_extra` and is named."""

    model_config = ConfigDict(extra="allow")

    model: str | None = Field(default=None, description="the served model's id (GET /v1/models); unset: it")
    # strict: a JSON `true` is not token 1, nor `max_tokens: 1`
    prompt: list[StrictInt] | list[list[StrictInt]] | str | list[str] = Field(
        description="token ids (one list, or a list of lists), or text when the checkpoint has a tokenizer"
    )
    max_tokens: StrictInt | None = Field(default=None, description="0 (score only) or 1 (one token from the last position)")
    temperature: StrictFloat | StrictInt | None = Field(default=None, description="> 0: log-probs at this temperature; 0: raw, greedy")
    prompt_logprobs: StrictInt | None = Field(default=None, description=f"top-k at every prompt position, 0..{MAX_TOP_K}")
    logprobs: StrictInt | None = Field(default=None, description=f"legacy top-k of the returned tokens, 0..{MAX_TOP_K}")
    echo: StrictBool = Field(default=False, description="return the prompt (and its log-probs with `logprobs`) too")
    seed: StrictInt | None = Field(default=None, description="for the sampled token of max_tokens=1 at temperature > 0")
    n: StrictInt | None = None
    best_of: StrictInt | None = None
    stream: StrictBool | None = None
    user: str | None = None


def parse_completions_body(payload: Any) -> CompletionsBody:
    """Validate the body; the errors name the fields, and unsupported ones all at once."""
    if not isinstance(payload, dict):
        raise InvalidRequest(f"the body must be a JSON object, got {type(payload).__name__}", "body")
    unsupported = sorted(
        name for name, value in payload.items()
        if name in NO_OP_VALUES and not any(_same(value, ok) for ok in NO_OP_VALUES[name])
    )
    known = set(CompletionsBody.model_fields) | set(NO_OP_VALUES)
    unknown = sorted(name for name in payload if name not in known)
    if unsupported or unknown:
        parts = []
        if unsupported:
            parts.append(f"unsupported here (this server scores, it does not generate): {', '.join(unsupported)}")
        if unknown:
            parts.append(f"unknown fields: {', '.join(unknown)}")
        raise InvalidRequest("; ".join(parts), ",".join(unsupported + unknown))
    try:
        body = CompletionsBody.model_validate({k: v for k, v in payload.items() if k in CompletionsBody.model_fields})
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ())) or "body"
        raise InvalidRequest(str(first.get("msg", "invalid value")), where) from None
    _check_values(body)
    return body


def _same(value: Any, no_op: Any) -> bool:
    """`1 == True` in Python; a JSON `true` is not the number 1 here."""
    return type(value) is type(no_op) and value == no_op if no_op is not None else value is None


def _check_values(body: CompletionsBody) -> None:
    if body.max_tokens is None:
        raise InvalidRequest("must be given, 0 or 1: this server scores prompts and returns at most one token "
                             "(OpenAI's default is 16)", "max_tokens")
    if body.max_tokens not in (0, 1):
        raise InvalidRequest(f"must be 0 or 1 (this server returns at most one token), got {body.max_tokens}",
                             "max_tokens")
    if body.temperature not in (None, 0) and (problem := temperature_problem(body.temperature)) is not None:
        raise InvalidRequest(f"{problem} (or 0: raw logits, greedy)", "temperature")
    for name in ("prompt_logprobs", "logprobs"):
        value = getattr(body, name)
        if value is not None and not 0 <= value <= MAX_TOP_K:
            raise InvalidRequest(f"must be between 0 and {MAX_TOP_K}, got {value}", name)
    if isinstance(body.prompt, list) and not body.prompt:
        raise InvalidRequest("must not be empty", "prompt")
    if isinstance(body.prompt, list) and any(isinstance(p, list) and not p for p in body.prompt):
        raise InvalidRequest("every prompt needs at least one token", "prompt")
    if body.max_tokens == 0 and not body.echo and body.logprobs is not None:
        raise InvalidRequest("with max_tokens 0 there is no returned token to give log-probs of; add echo", "logprobs")
