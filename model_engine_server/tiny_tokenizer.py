"""A small byte-level BPE tokenizer trained here, on a text this module carries (nothing is downloaded).

The tiny checkpoints are random models, so any tokenizer would do for their numbers; what the
tokenizer is for is the text side of the OpenAI-compatible routes (text prompts, `decoded_token`,
`tokens`) and clients that tokenize on their side (lm-eval's `tokenizer_backend=huggingface`). It
is byte-level with Qwen2's pipeline (NFC, Qwen2's pre-tokenizer split, byte-level BPE): every
string encodes (no unknown token) and decodes back to itself, and its ids are `< vocab_size`, so
every id it produces is one the model scores. Qwen2's pipeline because transformers 5's
`AutoTokenizer` rebuilds a `qwen2` checkpoint's tokenizer as `Qwen2Tokenizer` from the saved
vocabulary and merges with that pipeline (other model types load `tokenizer.json` as saved): with
the same pipeline and its `<|endoftext|>` in the vocabulary, both loaders give the same ids. The
same `vocab_size` trains the same merges, so a checkpoint made twice has the same tokenizer.
"""

from __future__ import annotations

from pathlib import Path

# Ids 0 and 1 are the tiny model's bos_token_id / eos_token_id (`tiny_model._config`); the eos is
# Qwen2Tokenizer's default unk / eos / pad, so rebuilding as Qwen2Tokenizer adds no id.
BOS, EOS = "<|bos|>", "<|endoftext|>"
SPECIAL_TOKENS = (BOS, EOS)
# How Qwen2's tokenizer splits text before byte-level BPE (contractions, letter runs with one
# leading non-letter, single digits, punctuation runs, newlines, spaces).
SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
BYTE_ALPHABET = 256
MIN_VOCAB_SIZE = BYTE_ALPHABET + len(SPECIAL_TOKENS)

# Written for this module: plain sentences with the words, digits and punctuation that prompts in
# tests and demos use, so the merges learnt from it make common words a few tokens long.
CORPUS = """\
The quick brown fox jumps over the lazy dog. A small model scores every token of a sequence.
Question: What colour is the sky on a clear day? Answer: blue.
Question: How many legs does a cat have? Answer: four.
Question: Which number comes after seven? Answer: eight.
Question: What do bees make? Answer: honey.
The server returns the log-probability of each token, the entropy of each position, and the
weight version of the model that computed them. The trainer reads these numbers, updates the
policy, and sends new weights to the server, which pauses, loads them, and resumes.
One, two, three, four, five, six, seven, eight, nine, ten. 0 1 2 3 4 5 6 7 8 9 10 100 1000.
The rollout samples a group of responses for every prompt; the reward of each response is
compared with the mean of its group. Old log-probs come from the policy that sampled them.
Red, green, blue, yellow, white, black. North, south, east, west. Monday, Tuesday, Friday.
In the morning the river is cold and quiet; in the evening the town is warm and loud.
She said that the answer was correct, and he wrote it down in the notebook before the test.
def score(tokens): return [model(token) for token in tokens]  # a line of code, too
"""


def build_tiny_tokenizer(vocab_size: int, model_max_length: int = 4096):  # -> PreTrainedTokenizerFast
    """A fast tokenizer with at most `vocab_size` ids: the 256 bytes, bos/eos, and BPE merges
    learnt from `CORPUS` up to the size (fewer if the text runs out of pairs to merge)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"a byte-level tokenizer needs a vocabulary of at least {MIN_VOCAB_SIZE} "
                         f"(256 bytes + bos/eos); the model has {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    assert tokenizer.token_to_id(BOS) == 0 and tokenizer.token_to_id(EOS) == 1
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS,
                                   unk_token=EOS, pad_token=EOS, model_max_length=model_max_length)


def save_tiny_tokenizer(output_dir: str | Path, vocab_size: int, model_max_length: int = 4096) -> Path:
    """Write `tokenizer.json` + `tokenizer_config.json` beside a checkpoint, as `save_pretrained`
    writes them, so `AutoTokenizer.from_pretrained(output_dir)` loads it offline."""
    output = Path(output_dir)
    build_tiny_tokenizer(vocab_size, model_max_length).save_pretrained(output)
    return output
