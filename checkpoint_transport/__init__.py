"""Moving weights from the trainer to every serving worker: buckets, backends, sender, receiver.

Publisher side: `get_backend(name).open_session(config)` opens the rendezvous and
`session.begin(group, receivers)` gives one sync's `TransportSpec`; rank 0 runs
`WeightSender.from_spec(spec).send(named_tensors, version)`.
Worker side: `receive_weights(spec.for_rank(r), engine.load_weights, version, expected_names)`
(or `receive_into_engine(spec, engine, version)` in a worker actor's method).
Backends: "gloo" and "nccl" (a per-sync torch.distributed broadcast group), "ray" (object store).
`clients.publisher.WeightPublisher` drives a whole sync against a server's weight session.
"""

from checkpoint_transport.bucket import BucketFormatError, BucketHeader, TensorEntry, group_into_buckets, pack_bucket, unpack_bucket
from checkpoint_transport.channel import get_backend, register_backend, transport_backends
from checkpoint_transport.checkpoint_files import iter_checkpoint
from checkpoint_transport.receiver import WeightReceiver, receive_into_engine, receive_weights
from checkpoint_transport.sender import WeightSender, send_weights
from checkpoint_transport.spec import (
    failure_reason,
    DEFAULT_BUCKET_BYTES,
    ReceiveReport,
    SendReport,
    TransportConfig,
    TransportError,
    TransportSpec,
    TransportTimeout,
)

__all__ = [
    "failure_reason",
    "BucketFormatError",
    "BucketHeader",
    "DEFAULT_BUCKET_BYTES",
    "get_backend",
    "group_into_buckets",
    "iter_checkpoint",
    "pack_bucket",
    "receive_into_engine",
    "receive_weights",
    "ReceiveReport",
    "register_backend",
    "send_weights",
    "SendReport",
    "TensorEntry",
    "transport_backends",
    "TransportConfig",
    "TransportError",
    "TransportSpec",
    "TransportTimeout",
    "unpack_bucket",
    "WeightReceiver",
    "WeightSender",
]
