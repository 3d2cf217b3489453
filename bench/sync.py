"""Weight sync: bandwidth of each transport against a plain memory copy, and the pause window.

For each backend (gloo, ray; nccl with two GPUs) one publisher syncs the fp32 weights of a
~150M-parameter decoder (610 MB in 256 MB buckets; `--quick`: 88 MB in 32 MB buckets) into a real `ModelEngineServer` whose
executor holds tensors of the same names and shapes: in host memory, or for gloo and ray on
`cuda:0` where CUDA is present (`server_device`). Timed side by side in the same run:
- `memcpy_gb_per_s`: copying the same tensors into the same destinations, nothing else;
- `gb_per_s`: the whole sync path (pack + checksum + transfer + verify + load into the
  destinations), from the first bucket offered to the last worker done (`transfer_s`);
- `pause_window_s`: how long the server did not dispatch (begin_weight_update -> commit), while
  a client kept submitting requests, so the drain is a real one.
The sync path copies every byte at least three times (pack, transport, load) and checksums it
twice, so `bandwidth_ratio` well below 1 is expected on CPU; the pause window should exceed
the transfer only by the drain and the commit.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from bench.common import Target, flatten, format_table, fixed_targets
from checkpoint_transport.receiver import receive_weights
from checkpoint_transport.spec import ReceiveReport, TransportConfig, TransportSpec
from checkpoint_transport.threads import run_in_thread
from clients.publisher import WeightPublisher
from model_engine_server.engines.base import ModelInfo, WeightSpec
from model_engine_server.errors import WeightSyncError
from model_engine_server.protocol import LogProbRequest, ScoreOutput
from model_engine_server.scheduler import ModelEngineServer, SchedulerConfig

TARGETS = [
    Target("gloo.bandwidth_ratio", ">=", 0.5),
    Target("ray.bandwidth_ratio", ">=", 0.5),
    Target("gloo.pause_window_s", "<=", "gloo.transfer_s", 1.1),
    Target("ray.pause_window_s", "<=", "ray.transfer_s", 1.1),
]
targets = fixed_targets(TARGETS)


def decoder_shapes(quick: bool) -> dict[str, tuple[int, ...]]:
    """HF names and shapes of a Qwen2/Llama-style decoder with tied embeddings."""
    hidden, ffn, layers, vocab = (512, 1536, 4, 16384) if quick else (768, 3072, 12, 50304)
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        prefix = f"model.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{prefix}.self_attn.{proj}.weight"] = (hidden, hidden)
        shapes[f"{prefix}.mlp.gate_proj.weight"] = (ffn, hidden)
        shapes[f"{prefix}.mlp.up_proj.weight"] = (ffn, hidden)
        shapes[f"{prefix}.mlp.down_proj.weight"] = (hidden, ffn)
        shapes[f"{prefix}.input_layernorm.weight"] = (hidden,)
        shapes[f"{prefix}.post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    return shapes


class TensorStoreExecutor:
    """An executor whose "model" is only its weights: loads copy into them (as an engine's
    `load_weights` does), scoring returns zeros at once. Enough for a real pause and drain."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], device: torch.device) -> None:
        self.tensors = {name: torch.zeros(shape, device=device) for name, shape in shapes.items()}
        self.info = ModelInfo("TensorStore", 1000, 1 << 16, 8, sum(t.numel() for t in self.tensors.values()),
                              "float32", str(device), True)

    def model_info(self) -> ModelInfo:
        return self.info

    async def execute(self, requests: Sequence[LogProbRequest]) -> list[ScoreOutput]:
        await asyncio.sleep(0.002)
        return [ScoreOutput(log_probs=np.zeros(r.num_response_tokens, dtype=np.float32)) for r in requests]

    async def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
        names = []
        for name, tensor in named_tensors:
            target = self.tensors.get(name)
            if target is None or target.shape != tensor.shape or target.dtype != tensor.dtype:
                raise WeightSyncError(f"unexpected weight {name!r}")
            target.copy_(tensor)
            names.append(name)
        return names

    async def weight_specs(self) -> dict[str, WeightSpec]:
        return {name: WeightSpec(tuple(t.shape), t.dtype) for name, t in self.tensors.items()}

    def participants(self) -> list[str]:
        return ["engine"]

    async def receive_weights(self, spec: TransportSpec, version: int, first_rank: int) -> list[ReceiveReport]:
        """One receiver in a daemon thread, copying each bucket into the tensors (on their device)."""
        device = next(iter(self.tensors.values())).device

        def load_bucket(tensors: list[tuple[str, torch.Tensor]]) -> list[str]:
            for name, tensor in tensors:
                self.tensors[name].copy_(tensor)
            return [name for name, _ in tensors]

        def receive() -> ReceiveReport:
            if device.type == "cuda":
                torch.cuda.set_device(device)
            return receive_weights(spec.for_rank(first_rank), load_bucket, version, set(self.tensors))

        return [await run_in_thread(receive)]

    async def discard_partial_weights(self) -> None:
        pass

    async def close(self) -> None:
        pass


def memcpy_seconds(source: dict[str, torch.Tensor], destination: dict[str, torch.Tensor]) -> float:
    """Time to copy every tensor into its (already touched) destination, nothing else."""
    _synchronize()
    started = time.perf_counter()
    for name, tensor in source.items():
        destination[name].copy_(tensor)
    _synchronize()
    return time.perf_counter() - started


def _synchronize() -> None:
    for index in range(torch.cuda.device_count()):
        torch.cuda.synchronize(index)


async def _client_load(server: ModelEngineServer, stop: asyncio.Event, answered: list[int]) -> None:
    """A client that keeps scoring during syncs: every pause has batches to drain."""
    request = {"input_ids": list(range(2, 66)), "response_start": 32}
    while not stop.is_set():
        results = await server.score([request] * 4)
        answered.append(sum(1 for r in results if hasattr(r, "log_probs")))


async def measure_backend(
    backend: str, source: dict[str, torch.Tensor], repeats: int, bucket_bytes: int, device: str = "cpu"
) -> dict[str, Any]:
    """Alternate a plain copy and a sync `repeats` times; keep the least disturbed of each.
    `device`: where the server's weights live (the source's device is the trainer's)."""
    shapes = {name: tuple(t.shape) for name, t in source.items()}
    executor = TensorStoreExecutor(shapes, torch.device(device))
    server = ModelEngineServer(executor, SchedulerConfig(max_wait_ms=1))
    config = TransportConfig(backend=backend, bucket_bytes=bucket_bytes, timeout_s=300)
    publisher = WeightPublisher(server, config)
    nbytes = sum(t.numel() * t.element_size() for t in source.values())
    stop, answered = asyncio.Event(), []
    load = asyncio.ensure_future(_client_load(server, stop, answered))
    copies, runs = [], []
    try:
        memcpy_seconds(source, executor.tensors)  # touches every destination page once
        await publisher.update_weights(source, 1)  # starts the rendezvous (a Ray actor, a TCP store)
        for version in range(2, repeats + 2):
            copies.extend(memcpy_seconds(source, executor.tensors) for _ in range(3))
            runs.append(await publisher.update_weights(source, version))
            await asyncio.sleep(0.1)  # a training step: the client is served between syncs
    finally:
        stop.set()
        await load
        await publisher.close()
        await server.shutdown()
    exact = all(torch.equal(executor.tensors[name].cpu(), source[name].cpu()) for name in source)
    copy_s = min(copies)
    best = min(runs, key=lambda r: r.transfer_s)
    return {
        "gb_per_s": nbytes / best.transfer_s / 1e9,
        "memcpy_gb_per_s": nbytes / copy_s / 1e9,
        "bandwidth_ratio": copy_s / best.transfer_s,
        "transfer_s": best.transfer_s,
        "pause_window_s": best.pause_window_s,
        "pause_over_transfer": best.pause_window_s / best.transfer_s,
        "memcpy_s": copy_s,
        "sender_pack_s": best.send.pack_s,
        "receiver_load_s": best.receives[0].load_s,
        "buckets": best.send.buckets,
        "weights_exact": exact,
        "requests_answered_during_run": int(sum(answered)),
    }


def _ensure_ray() -> bool:
    try:
        import ray
    except ImportError:
        return False
    if not ray.is_initialized():
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=2 << 30)
    return True


def server_device() -> str:
    """Where the server's weights live for gloo and ray: on a GPU machine that is the GPU, as a
    GPU server holds them (a CPU destination there would time another copy than a server's)."""
    return "cuda:0" if torch.cuda.is_available() else "cpu"


def run(quick: bool = False) -> dict[str, Any]:
    torch.manual_seed(0)
    shapes = decoder_shapes(quick)
    source = {name: torch.randn(shape) * 0.02 for name, shape in shapes.items()}
    nbytes = sum(t.numel() * t.element_size() for t in source.values())
    repeats = 3 if quick else 5
    bucket_bytes = (32 << 20) if quick else TransportConfig().bucket_bytes  # quick: still several buckets
    figures: dict[str, Any] = {
        "model_mb": round(nbytes / 1e6, 1),
        "parameters_m": round(sum(t.numel() for t in source.values()) / 1e6, 1),
        "bucket_mb": bucket_bytes >> 20,
    }
    # gloo and ray: the trainer's weights in host memory, the server's on the first GPU where
    # CUDA is present (each bucket is copied host-to-device on load, and `memcpy` is that same
    # host-to-device copy), else in host memory too. NCCL below needs a second GPU.
    device = server_device()
    figures["server_device"] = device
    figures["gloo"] = asyncio.run(measure_backend("gloo", source, repeats, bucket_bytes, device=device))
    if _ensure_ray():
        time.sleep(5)  # let Ray's start-up processes settle before timing
        figures["ray"] = asyncio.run(measure_backend("ray", source, repeats, bucket_bytes, device=device))
    if torch.cuda.device_count() >= 2:  # trainer on cuda:0, server on cuda:1; memcpy is the P2P copy
        torch.cuda.set_device(0)
        on_gpu = {name: tensor.to("cuda:0") for name, tensor in source.items()}
        figures["nccl"] = asyncio.run(measure_backend("nccl", on_gpu, repeats, bucket_bytes, device="cuda:1"))
    else:  # NCCL refuses two ranks on one GPU
        figures["nccl"] = {"skipped": "needs 2 GPUs (sender and receiver on distinct devices)"}
    return figures


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    figures = run(quick=args.quick)
    print(format_table(flatten(figures), f"sync ({'quick' if args.quick else 'full'})"))
    for target in TARGETS:
        print(target.check(figures))


if __name__ == "__main__":
    main()
