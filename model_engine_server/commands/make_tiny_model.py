"""`make-tiny-model DIR`: write a small random HF checkpoint and tokenizer (nothing can be downloaded)."""

from __future__ import annotations

import argparse
import json
import sys

from model_engine_server.tiny_model import ARCHITECTURES, TinyModelShape, make_tiny_model
from model_engine_server.tiny_tokenizer import MIN_VOCAB_SIZE


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("make-tiny-model", help=__doc__.split(":", 1)[1].strip())
    parser.add_argument("output_dir", help="the folder to write the checkpoint into (made if missing)")
    parser.add_argument("--arch", choices=ARCHITECTURES, default="qwen2", help="model family (default: qwen2)")
    defaults = TinyModelShape()
    shape_flags = {"--vocab-size": defaults.vocab_size, "--hidden-size": defaults.hidden_size,
                   "--intermediate-size": defaults.intermediate_size, "--num-layers": defaults.num_layers,
                   "--num-heads": defaults.num_heads, "--num-kv-heads": defaults.num_kv_heads}
    for flag, default in shape_flags.items():
        parser.add_argument(flag, type=int, default=default, help=f"(default: {default})")
    tied = parser.add_mutually_exclusive_group()
    tied.add_argument("--tied", dest="tie_word_embeddings", action="store_true", default=None,
                      help="share the input embedding with the LM head (default: the family's own choice)")
    tied.add_argument("--untied", dest="tie_word_embeddings", action="store_false", help="a separate LM head")
    parser.add_argument("--seed", type=int, default=0, help="of the random weights (default: 0)")
    parser.add_argument("--tokenizer", action=argparse.BooleanOptionalAction, default=None,
                        help="write a byte-level tokenizer trained here (default: when the vocabulary "
                             f"holds one, {MIN_VOCAB_SIZE}+ tokens)")
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
    if (problem := shape.problem()) is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    fits = shape.vocab_size >= MIN_VOCAB_SIZE
    if args.tokenizer and not fits:
        print(f"error: --tokenizer needs --vocab-size {MIN_VOCAB_SIZE} or more (256 bytes + bos/eos), "
              f"not {shape.vocab_size}", file=sys.stderr)
        return 2
    tokenizer = fits if args.tokenizer is None else args.tokenizer
    try:
        path = make_tiny_model(args.output_dir, shape, seed=args.seed, tokenizer=tokenizer)
    except OSError as error:  # the output path is a file, or not writable
        print(f"error: cannot write the model to {args.output_dir}: {error.strerror or error}", file=sys.stderr)
        return 1
    config = json.loads((path / "config.json").read_text())
    tokenizer_note = "with a tokenizer" if tokenizer else (
        "no tokenizer" if args.tokenizer is False else f"no tokenizer: vocab below {MIN_VOCAB_SIZE}")
    print(f"wrote {config['architectures'][0]} ({config['vocab_size']} vocab, "
          f"tied={config.get('tie_word_embeddings')}, {tokenizer_note}) to {path}")
    return 0
