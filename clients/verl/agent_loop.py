"""A verl agent loop that scores each finished trajectory on the server, then hands it on.

`model_engine_server_agent` (registered in verl's agent-loop registry, and loadable from
`actor_rollout_ref.rollout.agent.agent_loop_config_path`, see `agent_loop.yaml` beside this module)
runs an inner agent loop chosen by its registered name (`inner_agent`, default verl's
`single_turn_agent`; `tool_agent` or any loop of the same YAML works too). The moment the inner
loop returns its `AgentLoopOutput`, the prompt + response ids are scored on the server at the
sampling temperature, with the rollout's own `response_logprobs` sent along for the server's
mismatch statistics. The output is otherwise untouched (`response_logprobs` included): the
server's answer goes into `output.extra_fields` under the names of `server_fields`
(`result_fields`), which verl's `AgentLoopWorker._postprocess` turns into `non_tensor_batch`
columns the trainer reads (`clients.verl.fully_async_trainer`, `clients.verl.trainer_v1`).

A trajectory is never dropped here: if the server cannot score it (unreachable, overloaded past
the deadline, a request it refuses), `error_fields(reason)` are attached instead and the
trainer's `on_missing` rule decides (recompute, rescore, or fail naming the sample). So does a
multimodal trajectory (images, videos, audio): the server scores token ids only.

Validation: verl samples validation prompts with `val_kwargs.temperature`, 0 (greedy) by
default, and never trains on them. A greedy trajectory is not scored (the server scores
sampling distributions at a temperature > 0, and nothing would read the numbers); it carries
`error_fields` saying so, which keeps the columns of every batch the same. A validation run at a
temperature > 0 is indistinguishable from training inside an agent loop and is scored; that
costs server time only.

Where the server is: the `model_engine_server.trainer:` section of the training config
(`address` for HTTP, else the Ray actor `actor_name` in `ray_namespace`); `score_ref: true`
also asks for the reference policy's log-probs (the server's ref mode must be on).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import hydra
from pydantic import ValidationError
from verl.experimental.agent_loop.agent_loop import AgentLoopBase, AgentLoopOutput, _agent_loop_registry, register

from clients.agent_loop import build_request
from clients.base import LogProbClient
from clients.verl.connection import shared_client, where
from clients.verl.server_fields import error_fields, result_fields, trainer_side_config
from model_engine_server.config.trainer_side import TrainerSideConfig
from model_engine_server.errors import ModelEngineError
from model_engine_server.protocol import LogProbResult, invalid_request_from

logger = logging.getLogger(__name__)

AGENT_NAME = "model_engine_server_agent"
DEFAULT_INNER_AGENT = "single_turn_agent"


def _request(output: AgentLoopOutput, temperature: float, rules: TrainerSideConfig):
    """The server request for one trajectory. The rollout's log-probs go along only when they
    cover the response token for token (the server refuses any other length) and every token is
    the model's own: tool and observation tokens (`response_mask` 0) carry a placeholder 0.0
    that the server's unmasked mismatch statistics would count as a disagreement. The trainer's
    own mismatch metrics are masked and stay."""
    rollout = output.response_logprobs
    if rollout is not None and (len(rollout) != len(output.response_ids) or 0 in output.response_mask):
        rollout = None
    return build_request(output.prompt_ids, output.response_ids, temperature, rollout,
                         return_ref_log_probs=rules.score_ref)


async def server_fields_for(
    output: AgentLoopOutput, temperature: float, rules: TrainerSideConfig, client: LogProbClient | None = None
) -> dict[str, Any]:
    """`result_fields` of the server's answer for `output`, or `error_fields` saying why not."""
    if temperature <= 0:
        return error_fields("not scored: greedy sampling (temperature 0), e.g. a validation rollout")
    media = sorted(kind for kind, items in (output.multi_modal_data or {}).items() if items)
    if media:  # the ids alone are not the model's input: scoring them would give wrong numbers
        return error_fields(f"not scored: the trajectory carries {', '.join(media)} and the server scores text only")
    try:
        request = _request(output, temperature, rules)
    except ValidationError as error:
        return error_fields(f"not scored: {invalid_request_from(error)}")
    try:
        client = client or shared_client(rules)
        [outcome] = await client.score([request], rules.timeout_s)
    except Exception as error:  # never drop the trajectory: any failure becomes the trainer's rule
        logger.warning("scoring on the server at %s failed: %s: %s", where(rules), type(error).__name__, error)
        return error_fields(f"server at {where(rules)} unreachable: {type(error).__name__}: {error}")
    if isinstance(outcome, ModelEngineError):
        return error_fields(f"server refused ({outcome.code}): {outcome}")
    assert isinstance(outcome, LogProbResult)
    return result_fields(outcome)


async def attach_server_fields(
    output: AgentLoopOutput, temperature: float, rules: TrainerSideConfig, client: LogProbClient | None = None
) -> AgentLoopOutput:
    """Score `output` and write the fields into its `extra_fields`; returns the same object."""
    output.extra_fields.update(await server_fields_for(output, temperature, rules, client))
    return output


def instantiate_loop(name: str, loop_kwargs: dict[str, Any]) -> AgentLoopBase:
    """The agent loop registered as `name`, built the way verl's `AgentLoopWorker` builds one."""
    if name not in _agent_loop_registry:
        raise ValueError(f"inner agent loop {name!r} is not registered; registered: {sorted(_agent_loop_registry)}")
    if name == AGENT_NAME:
        raise ValueError(f"{AGENT_NAME} cannot wrap itself; name a loop that generates, e.g. {DEFAULT_INNER_AGENT}")
    return hydra.utils.instantiate(config=_agent_loop_registry[name], **loop_kwargs)


@register(AGENT_NAME)
class ModelEngineServerAgentLoop(AgentLoopBase):
    """Runs `inner_agent`, then scores its trajectory on the server (see the module docstring)."""

    def __init__(
        self,
        trainer_config: Any,
        server_manager: Any,
        tokenizer: Any,
        processor: Any,
        dataset_cls: Any,
        data_config: Any,
        hf_model_type: str | None = None,
        inner_agent: str = DEFAULT_INNER_AGENT,
        **kwargs: Any,
    ) -> None:
        kwargs.pop("name", None)  # the YAML entry's own name, which hydra passes on as an argument
        loop_kwargs = dict(trainer_config=trainer_config, server_manager=server_manager, tokenizer=tokenizer,
                           processor=processor, dataset_cls=dataset_cls, data_config=data_config,
                           hf_model_type=hf_model_type, **kwargs)
        super().__init__(**loop_kwargs)
        self.inner = instantiate_loop(inner_agent, loop_kwargs)
        self.rules = trainer_side_config(self.config)

    async def run(self, sampling_params: dict[str, Any], **kwargs: Any) -> AgentLoopOutput | list[AgentLoopOutput]:
        """The inner loop's output, each trajectory scored (V1's workers take a list of them too)."""
        output = await self.inner.run(sampling_params, **kwargs)
        temperature = float(sampling_params.get("temperature", self.rollout_config.temperature))
        if isinstance(output, list):
            return list(await asyncio.gather(*(attach_server_fields(o, temperature, self.rules) for o in output)))
        return await attach_server_fields(output, temperature, self.rules)

