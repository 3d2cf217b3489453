"""A `WeightReceiver` read as a pull-style stream of buckets (for a consumer that iterates).

The receiver pushes: it calls `load_bucket(views)` with tensors that are views into a pooled
buffer, valid only during the call, and only then goes on to the next bucket. A consumer that
pulls (verl's rollout worker iterates `receive_weights()`) gets each bucket from `next_bucket`
while the receiver's thread waits inside `load_bucket` until `release` says the consumer is done
with the views. The receiver's own guarantees are kept: checksums and order are verified before
a bucket is handed over, and a consumer that stops early (`close`) makes every later bucket fail
to load, so the receiver keeps taking part in the collective to the end without loading anything.
"""

from __future__ import annotations

import queue
import threading

import torch

from checkpoint_transport.receiver import WeightReceiver
from checkpoint_transport.spec import ReceiveReport

Bucket = list[tuple[str, torch.Tensor]]


class ConsumerStopped(RuntimeError):
    """The consumer stopped reading before the stream ended."""


class BucketHandoff:
    """One stream's buckets, handed from the receiver's thread to a consumer, one at a time."""

    def __init__(self) -> None:
        self._ready: queue.Queue[Bucket | None] = queue.Queue()  # None: the stream ended
        self._done: queue.Queue[bool] = queue.Queue()  # True: the consumer is done with the views
        self._closed = threading.Event()

    def run(self, receiver: WeightReceiver, version: int | None) -> ReceiveReport:
        """The receiver's side (blocking): receive the whole stream, handing each bucket over."""
        try:
            return receiver.receive(self._load, version)
        finally:
            self._ready.put(None)

    def _load(self, bucket: Bucket) -> list[str]:
        if self._closed.is_set():
            raise ConsumerStopped("the consumer stopped reading the stream")
        self._ready.put(bucket)
        if not self._done.get():
            raise ConsumerStopped("the consumer stopped reading the stream")
        return [name for name, _ in bucket]

    def next_bucket(self) -> Bucket | None:
        """The consumer's side (blocking): the next verified bucket, or None at the end."""
        return self._ready.get()

    def release(self) -> None:
        """The consumer is done with the last bucket's views: the receiver may reuse them."""
        self._done.put(True)

    def close(self) -> None:
        """The consumer reads no more: the bucket it holds (if any) and every later one fail."""
        self._closed.set()
        self._done.put(False)
