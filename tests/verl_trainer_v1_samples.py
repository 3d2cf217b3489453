"""The samples of the V1 trainer tests, made as verl's agent loop makes them, and the
stand-in for the actor's worker group (`tests/test_verl_trainer_v1.py` says why it is one)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np
import torch

from clients.http_client import SyncHttpLogProbClient
from clients.verl import server_fields as sf
from model_engine_server.protocol import LogProbRequest, LogProbResult
from tests.verl_reference import left_right_batch, recompute

VOCAB = 512
PARTITION = "train"


# ---------------------------------------------------------------- samples, as the agent loop makes them
@dataclass
class Sample:
    key: str
    prompt: list[int]
    response: list[int]
    response_mask: list[int]  # 0: tool tokens, which are scored all the same and masked by the loss

    def request(self, temperature: float) -> LogProbRequest:
        return LogProbRequest(input_ids=self.prompt + self.response, response_start=len(self.prompt),
                              temperature=temperature, return_entropy=True, return_ref_log_probs=True)


SHAPES = [(6, 9, None), (11, 3, None), (4, 14, (4, 8)), (8, 1, None), (5, 6, None)]  # prompt, response, tool span


def make_samples(tag: str, seed: int) -> list[Sample]:
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for row, (prompt_len, response_len, tool) in enumerate(SHAPES):
        ids = torch.randint(1, VOCAB, (prompt_len + response_len,), generator=generator).tolist()
        mask = [1] * response_len
        if tool:
            mask[tool[0]:tool[1]] = [0] * (tool[1] - tool[0])
        samples.append(Sample(f"{tag}{row}x_0_0", ids[:prompt_len], ids[prompt_len:], mask))
    return samples


def score(url: str, samples: list[Sample], temperature: float) -> list[LogProbResult]:
    with SyncHttpLogProbClient(url) as client:
        return client.compute_log_probs([s.request(temperature) for s in samples])


def rollout_log_probs(results: list[LogProbResult]) -> list[list[float]]:
    """A rollout engine's numbers: near the server's, not equal (for verl's debug metrics)."""
    return [(np.asarray(r.log_probs) - 0.01 * (1 + np.arange(len(r.log_probs)) % 3)).tolist() for r in results]


def put_like_agent_loop(tq, samples: list[Sample], extra: list[dict], rollout: list[list[float]], version: int = 0):
    """The fields and tags `AgentLoopWorkerTQ._agent_loop_postprocess` puts for each trajectory,
    then the batch the replay buffer would hand out for them (keys with their listed tags)."""
    from transfer_queue import KVBatchMeta
    from verl.experimental.agent_loop import AgentLoopOutput
    from verl.experimental.agent_loop.agent_loop import AgentLoopMetrics
    from verl.utils.model import compute_position_id_with_mask
    from verl.utils.tensordict_utils import list_of_dict_to_tensordict

    fields, tags = [], []
    for row, (sample, server_fields, rollout_row) in enumerate(zip(samples, extra, rollout, strict=True)):
        output = AgentLoopOutput(
            prompt_ids=sample.prompt, response_ids=sample.response, response_mask=sample.response_mask,
            response_logprobs=rollout_row, reward_score=float(row % 2), num_turns=2, metrics=AgentLoopMetrics(),
            extra_fields={"min_global_steps": version, "max_global_steps": version, "reward_extra_info": {},
                          **server_fields},
        )
        field = output.as_dict()
        field.update(uid=sample.key.split("_")[0], session_id=0, global_steps=version + 1, index=row)
        input_ids = torch.cat([field["prompts"], field["responses"]])
        field.update(loss_mask=field["response_mask"], input_ids=input_ids, multi_modal_inputs={},
                     position_ids=compute_position_id_with_mask(torch.ones_like(input_ids)[None])[0])
        fields.append(field)
        tags.append({"status": "success", "prompt_len": len(sample.prompt), "response_len": len(sample.response),
                     "seq_len": len(input_ids), "global_steps": version + 1,
                     "min_global_steps": version, "max_global_steps": version})
    keys = [s.key for s in samples]
    asyncio.run(tq.async_kv_batch_put(keys=keys, fields=list_of_dict_to_tensordict(fields), tags=tags,
                                      partition_id=PARTITION))
    listed = tq.kv_list(PARTITION)[PARTITION]
    return KVBatchMeta(partition_id=PARTITION, keys=keys, tags=[listed[k] for k in keys])


def scored_batch(tq, url: str, samples: list[Sample], temperature: float):
    results = score(url, samples, temperature)
    batch = put_like_agent_loop(tq, samples, [sf.result_fields(r) for r in results], rollout_log_probs(results))
    return batch, results


def written(tq, batch, *names: str) -> dict[str, torch.Tensor]:
    """What the step wrote, as verl's later steps read it: nested, then padded with zeros."""
    data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=list(names))
    for name in names:
        assert data[name].is_nested and data[name].dtype == torch.float32, name
    return {name: data[name].to_padded_tensor(0) for name in names}


def verl_recompute(worker, samples: list[Sample], temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    return recompute(worker, left_right_batch([s.prompt for s in samples], [s.response for s in samples]), temperature)


def assert_zero_past_responses(values: torch.Tensor, samples: list[Sample]) -> None:
    for row, sample in enumerate(samples):
        assert torch.count_nonzero(values[row, len(sample.response):]) == 0


def max_diff(got: torch.Tensor, expected: torch.Tensor, rows: int) -> float:
    width = expected.shape[1]
    return float((got[:rows, :width] - expected).abs().max())


class InProcessActorGroup:
    """The actor worker group's calls that verl's recompute makes, on one in-process verl
    `TrainingWorker` (see the module docstring)."""

    def __init__(self, worker) -> None:
        self.worker = worker
        self.calls: list[tuple[str, int]] = []

    def compute_log_prob(self, batch):
        return self.worker.infer_batch(batch)  # verl's @register wraps it in the TransferQueue bridge

    def save_model_to_cpu(self, n: int) -> None:
        self.calls.append(("save_model_to_cpu", n))

    def restore_model_from_cpu(self, n: int) -> None:
        self.calls.append(("restore_model_from_cpu", n))

    def clear_cpu_model(self, n: int) -> None:
        self.calls.append(("clear_cpu_model", n))
