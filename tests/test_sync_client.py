"""The blocking client over a real in-process server: a call past `call_timeout_s` is cancelled
on the client's loop and raises `DeadlineExceeded`, and what it started never lands afterwards.

Failed before: the caller got a bare `TimeoutError` while the call ran on, so a weight update
it had been told failed still committed once its tensors arrived.
"""

from __future__ import annotations

import time
from typing import Iterable, Iterator

import pytest
import torch

from clients.base import SyncLogProbClient
from clients.local_client import LocalClient
from model_engine_server.engines.base import EngineSpec
from model_engine_server.errors import DeadlineExceeded
from model_engine_server.local import build_local_server
from model_engine_server.scheduler import SchedulerConfig
from model_engine_server.tiny_model import perturbed_weights

TIMEOUT_S = 0.5


class ServerOwningClient(LocalClient):
    """Shuts its server down on close, on the loop the server ran on."""

    async def close(self) -> None:
        await self.service.shutdown(drain=False, timeout_s=5.0)


def _slowly(named: Iterable[tuple[str, torch.Tensor]], delay_s: float) -> Iterator[tuple[str, torch.Tensor]]:
    for item in named:
        time.sleep(delay_s)
        yield item


def test_a_call_past_its_timeout_is_cancelled_and_its_update_never_lands(tiny_model):
    server = build_local_server(EngineSpec(model_path=str(tiny_model)), scheduler=SchedulerConfig(request_timeout_s=60))
    weights = perturbed_weights(dict(server.executor.adapter.engine.export_weights()), seed=5)
    with SyncLogProbClient(ServerOwningClient(server), call_timeout_s=TIMEOUT_S) as client:
        with pytest.raises(DeadlineExceeded, match=f"call_timeout_s={TIMEOUT_S:g}"):
            client.update_weights(_slowly(weights.items(), delay_s=0.1), 1)  # about 2.6 s of tensors
        time.sleep(3.0)  # longer than the stream would have taken
        status = client.get_status()
        assert status["weight_version"] == 0 and not status["updating_weights"], status
        assert status["weights_incomplete"]  # partly overwritten: nothing serves the mix

        client.pause_serving()
        with pytest.raises(DeadlineExceeded):
            client.compute_log_probs([{"input_ids": [1, 2, 3, 4], "response_start": 2}])
        assert client.get_status()["queue_depth"] == 0  # the cancelled request left the queue
        client.resume_serving()
