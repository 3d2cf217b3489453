"""`make-tiny-model DIR`: write a small random HF checkpoint (nothing can be downloaded)."""

from __future__ import annotations

import argparse
import json

from model_engine_server.tiny_model import ARCHITECTURES, TinyModelShape, make_tiny_model


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("make-tiny-model", help=__doc__.split(":", 1)[1].strip())
    parser.add_argument("output_dir")
    parser.add_argument("--arch", choices=ARCHITECTURES, default="qwen2")
    defaults = TinyModelShape()
    parser.add_argument("--vocab-size", type=int, default=defaults.vocab_size)
    parser.add_argument("--hidden-size", type=int, default=defaults.hidden_size)
    parser.add_argument("--intermediate-size", type=int, default=defaults.intermediate_size)
    parser.add_argument("--num-layers", type=int, default=defaults.num_layers)
    parser.add_argument("--num-heads", type=int, default=defaults.num_heads)
    parser.add_argument("--num-kv-heads", type=int, default=defaults.num_kv_heads)
    tied = parser.add_mutually_exclusive_group()
    tied.add_argument("--tied", dest="tie_word_embeddings", action="store_true", default=None)
    tied.add_argument("--untied", dest="tie_word_embeddings", action="store_false")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    shape = TinyModelShape(
        arch=args.arch,
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        num_kv_heads=args.num_kv_heads,
        tie_word_embeddings=args.tie_word_embeddings,
    )
    path = make_tiny_model(args.output_dir, shape, seed=args.seed)
    config = json.loads((path / "config.json").read_text())
    print(f"wrote {config['architectures'][0]} ({config['vocab_size']} vocab, "
          f"tied={config.get('tie_word_embeddings')}) to {path}")
    return 0
