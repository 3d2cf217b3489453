"""The scoring agent loop inside verl's own `AgentLoopWorker`: found in verl's registry and through
an `agent_loop_config_path` YAML, wrapping verl's `single_turn_agent` and `tool_agent`, scoring
every finished trajectory on a real server (uvicorn on 127.0.0.1, HF backend, a tiny local model)
and attaching exactly the server's answer; a server that fails leaves error fields on a sample
that is still there. The only stand-in is the rollout engine (`tests/verl_pipeline.py`)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from model_engine_server.engines.verl_backend.cpu_platform import accelerator_present, use_cpu_platform

if not accelerator_present():
    use_cpu_platform()  # before verl is used: verl resolves its platform once per process

import hydra  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from verl import DataProto  # noqa: E402
from verl.experimental.agent_loop.agent_loop import (  # noqa: E402
    AgentLoopBase,
    AgentLoopMetrics,
    AgentLoopOutput,
    AgentLoopWorker,
    DictConfigWrap,
    ToolListWrap,
    _agent_loop_registry,
    register,
)

from clients.http_client import HttpLogProbClient  # noqa: E402
from clients.verl import connection  # noqa: E402
from clients.verl import server_fields as sf  # noqa: E402
from clients.verl.agent_loop_yaml import AGENT_LOOP_YAML  # noqa: E402
from clients.verl.agent_loop import AGENT_NAME, ModelEngineServerAgentLoop, _request, server_fields_for  # noqa: E402
from model_engine_server.protocol import LogProbRequest  # noqa: E402
from model_engine_server.tiny_model import make_tiny_model  # noqa: E402
from tests.verl_pipeline import (  # noqa: E402
    SamplingRollout,
    compose_fully_async,
    cpu_overrides,
    object_column,
    save_tokenizer,
    served,
    with_settings,
)

TEMPERATURE = 0.8
TOLERANCE = 1e-5  # the same server scoring the same ids, possibly batched differently


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    model = make_tiny_model(tmp_path_factory.mktemp("verl_agent_loop") / "model")
    save_tokenizer(model)
    return model


@pytest.fixture(scope="module")
def server(model_dir):
    with served(model_dir) as running:
        yield running


@pytest.fixture(scope="module")
def config(model_dir, server):
    agent = "actor_rollout_ref.rollout.agent"
    return compose_fully_async(cpu_overrides(model_dir, server.url, TEMPERATURE) + [
        f"{agent}.agent_loop_config_path={AGENT_LOOP_YAML}", f"{agent}.default_agent_loop={AGENT_NAME}",
        "actor_rollout_ref.rollout.val_kwargs.temperature=0",
    ])


@pytest.fixture(scope="module")
def rollout(config, model_dir):
    return SamplingRollout(config, model_dir)


@pytest.fixture(scope="module")
def worker(config, rollout):
    return AgentLoopWorker(config, rollout)


def prompts_batch(agent_name: str, count: int = 3, validate: bool = False) -> DataProto:
    messages = [[{"role": "user", "content": f"question {i}: " + "why " * (i + 1)}] for i in range(count)]
    return DataProto.from_dict(
        non_tensors={"raw_prompt": object_column(messages), "agent_name": object_column([agent_name] * count),
                     "index": np.arange(count)},
        meta_info={"validate": validate},
    )


async def server_answer(url: str, prompt: list[int], response: list[int], temperature: float):
    async with HttpLogProbClient(url) as client:
        request = LogProbRequest(input_ids=prompt + response, response_start=len(prompt), temperature=temperature,
                                 return_entropy=True)
        [result] = await client.compute_log_probs([request])
    return result


def row_ids(output: DataProto, row: int) -> tuple[list[int], list[int]]:
    prompt_width = output.batch["prompts"].shape[1]
    mask = output.batch["attention_mask"][row].bool()
    return (output.batch["prompts"][row][mask[:prompt_width]].tolist(),
            output.batch["responses"][row][mask[prompt_width:]].tolist())


# ---------------------------------------------------------------- registration
def test_registered_in_verls_registry_and_loaded_from_the_yaml(worker):
    target = f"{ModelEngineServerAgentLoop.__module__}.{ModelEngineServerAgentLoop.__qualname__}"
    assert _agent_loop_registry[AGENT_NAME]["_target_"] == target
    # verl's worker loaded the shipped YAML into its registry: both entries, with their inner loops
    assert _agent_loop_registry["model_engine_server_tool_agent"]["inner_agent"] == "tool_agent"
    assert _agent_loop_registry[AGENT_NAME]["inner_agent"] == "single_turn_agent"


def test_the_yaml_entry_instantiates_around_verls_tool_agent(worker):
    from verl.experimental.agent_loop.tool_agent_loop import ToolAgentLoop

    loop = hydra.utils.instantiate(
        config=_agent_loop_registry["model_engine_server_tool_agent"], trainer_config=DictConfigWrap(worker.config),
        server_manager=worker.llm_client, tokenizer=worker.tokenizer, processor=worker.processor,
        hf_model_type=worker.hf_model_type, dataset_cls=worker.dataset_cls,
        data_config=DictConfigWrap(worker.config.data), tools=ToolListWrap(worker.tools),
    )
    assert isinstance(loop, ModelEngineServerAgentLoop) and isinstance(loop.inner, ToolAgentLoop)
    assert loop.rules.address == worker.config.model_engine_server.trainer.address


# ---------------------------------------------------------------- scoring
@pytest.mark.parametrize("agent_name", [AGENT_NAME, "model_engine_server_tool_agent"])
async def test_each_trajectory_carries_the_servers_answer(worker, rollout, server, agent_name):
    output = await worker.generate_sequences(prompts_batch(agent_name))
    columns = output.non_tensor_batch
    assert len(output) == 3
    for row in range(len(output)):
        prompt, response = row_ids(output, row)
        expected = await server_answer(server.url, prompt, response, TEMPERATURE)
        assert columns[sf.ERROR][row] is None and columns[sf.WEIGHT_VERSION][row] == 0
        np.testing.assert_allclose(columns[sf.LOG_PROBS][row], expected.log_probs, atol=TOLERANCE, rtol=0)
        np.testing.assert_allclose(columns[sf.ENTROPY][row], expected.entropy, atol=TOLERANCE, rtol=0)
        # the rollout's own log-probs are kept as the rollout engine returned them
        kept = output.batch["rollout_log_probs"][row, : len(response)]
        assert torch.equal(kept, torch.tensor(rollout.returned[tuple(response)], dtype=torch.float32))
    lengths = output.batch["attention_mask"][:, output.batch["prompts"].shape[1]:].sum(1)
    assert len(set(lengths.tolist())) > 1  # the batch has varied response lengths


def worker_rules(worker):
    return sf.trainer_side_config(worker.config)


async def test_one_client_per_process_and_event_loop(worker):
    rules = worker_rules(worker)
    assert connection.shared_client(rules) is connection.shared_client(rules)
    other_loop_client = await asyncio.to_thread(lambda: asyncio.run(_client_in_new_loop(rules)))
    assert other_loop_client is not connection.shared_client(rules)


async def _client_in_new_loop(rules):
    return connection.shared_client(rules)


async def test_greedy_validation_rollouts_are_kept_and_not_scored(worker):
    output = await worker.generate_sequences(prompts_batch(AGENT_NAME, count=2, validate=True))
    assert len(output) == 2
    for row in range(2):
        assert output.non_tensor_batch[sf.LOG_PROBS][row] is None
        assert "greedy" in output.non_tensor_batch[sf.ERROR][row]


async def test_an_unreachable_server_leaves_error_fields_on_every_sample(config, rollout, unused_tcp_port):
    unreachable = with_settings(config, {"model_engine_server.trainer.address": f"http://127.0.0.1:{unused_tcp_port}",
                                         "model_engine_server.trainer.timeout_s": 1.0})
    output = await AgentLoopWorker(unreachable, rollout).generate_sequences(prompts_batch(AGENT_NAME, count=2))
    assert len(output) == 2 and output.batch["responses"].shape[0] == 2
    for row in range(2):
        assert output.non_tensor_batch[sf.LOG_PROBS][row] is None
        assert "unreachable" in output.non_tensor_batch[sf.ERROR][row]
    samples = [sf.SampleScores.from_fields({k: output.non_tensor_batch[k][row] for k in sf.FIELDS}) for row in range(2)]
    with pytest.raises(sf.ServerLogProbsUnusable, match="unreachable"):
        sf.plan_batch(samples, [3, 3], 0, sf.TrainerSideConfig(on_missing="fail"))


async def test_a_request_the_server_refuses_leaves_its_reason(worker):
    output = AgentLoopOutput(prompt_ids=[5, 6, 7], response_ids=[8, 100_000], response_mask=[1, 1],
                             response_logprobs=[-1.0, -2.0], metrics=AgentLoopMetrics())
    fields = await server_fields_for(output, TEMPERATURE, worker_rules(worker))
    assert fields[sf.LOG_PROBS] is None and "invalid_request" in fields[sf.ERROR]
    assert "outside the vocabulary" in fields[sf.ERROR]


async def test_tool_tokens_do_not_enter_the_servers_mismatch(worker, server):
    """verl gives tool and observation tokens mask 0 and log-prob 0.0; the model's own tokens
    here carry the server's exact values, so a mismatch counted over them all would be large."""
    prompt, response = [5, 6, 7, 9], [8, 11, 12, 13, 14]
    exact = (await server_answer(server.url, prompt, response, TEMPERATURE)).log_probs
    mask = [1, 0, 0, 1, 1]
    rollout = [float(x) if kept else 0.0 for x, kept in zip(exact, mask)]
    output = AgentLoopOutput(prompt_ids=prompt, response_ids=response, response_mask=mask,
                             response_logprobs=rollout, metrics=AgentLoopMetrics())
    rules = worker_rules(worker)
    assert _request(output, TEMPERATURE, rules).rollout_log_probs is None
    fields = await server_fields_for(output, TEMPERATURE, rules)
    np.testing.assert_allclose(fields[sf.LOG_PROBS], exact, atol=TOLERANCE, rtol=0)
    whole = output.model_copy(update={"response_mask": [1] * 5, "response_logprobs": [float(x) for x in exact]})
    assert _request(whole, TEMPERATURE, rules).rollout_log_probs == pytest.approx(list(exact))


async def test_a_multimodal_trajectory_is_kept_and_not_scored(worker):
    output = AgentLoopOutput(prompt_ids=[5, 6, 7], response_ids=[8, 9], response_mask=[1, 1],
                             multi_modal_data={"images": ["an image"], "videos": None}, metrics=AgentLoopMetrics())
    fields = await server_fields_for(output, TEMPERATURE, worker_rules(worker))
    assert fields[sf.LOG_PROBS] is None and "images" in fields[sf.ERROR] and "text only" in fields[sf.ERROR]
    text_only = output.model_copy(update={"multi_modal_data": {}})
    assert (await server_fields_for(text_only, TEMPERATURE, worker_rules(worker)))[sf.ERROR] is None


TWO_TRAJECTORIES = [([5, 6, 7], [8, 9]), ([5, 6, 7, 8, 9, 10], [11, 12, 13])]


@register("test_two_outputs_agent")
class TwoOutputsAgentLoop(AgentLoopBase):
    """An inner loop that returns two trajectories, as verl's V1 workers allow."""

    async def run(self, sampling_params, **kwargs):
        return [AgentLoopOutput(prompt_ids=p, response_ids=r, response_mask=[1] * len(r), metrics=AgentLoopMetrics())
                for p, r in TWO_TRAJECTORIES]


async def test_an_inner_loop_with_several_outputs_has_each_scored(worker, server):
    loop = ModelEngineServerAgentLoop(
        trainer_config=DictConfigWrap(worker.config), server_manager=worker.llm_client, tokenizer=worker.tokenizer,
        processor=worker.processor, dataset_cls=worker.dataset_cls, data_config=DictConfigWrap(worker.config.data),
        hf_model_type=worker.hf_model_type, inner_agent="test_two_outputs_agent",
    )
    outputs = await loop.run({"temperature": TEMPERATURE})
    assert [len(o.extra_fields[sf.LOG_PROBS]) for o in outputs] == [2, 3]
    for output, (prompt, response) in zip(outputs, TWO_TRAJECTORIES):
        expected = await server_answer(server.url, prompt, response, TEMPERATURE)
        np.testing.assert_allclose(output.extra_fields[sf.LOG_PROBS], expected.log_probs, atol=TOLERANCE, rtol=0)
