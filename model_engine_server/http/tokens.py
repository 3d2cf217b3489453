"""Token ids <-> text for the OpenAI-compatible routes, from the checkpoint folder's tokenizer.

The server scores token ids and needs no tokenizer. When the served checkpoint folder holds one
(`tokenizer.json` or `tokenizer_config.json`, as `save_pretrained` writes them), text prompts are
encoded with it and `decoded_token` / `tokens` are its decodings; without one, text prompts are
refused and a token's text is its id as a decimal string ("1234"), which keeps the legacy
`top_logprobs` maps (keyed by token text) unambiguous.

A token's text alone (`decode`) is not its share of a sequence's text: SentencePiece drops a
word's leading space when the token is decoded by itself, and a byte-level token holding part
of a UTF-8 character decodes to U+FFFD. `pieces` decodes in context, as vLLM's incremental
detokenizer does: a token's piece is what it adds to the text of the tokens before it (a
character split over tokens comes whole at its last one), so the pieces join into the text.
"""

from __future__ import annotations

import threading
from functools import lru_cache
from pathlib import Path
from typing import Any

from model_engine_server.errors import InvalidRequest

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# UTF-8 takes at most 4 bytes a character, so a byte-level tokenizer completes one within 4
# tokens; past that the tokens are given out as decoded (with U+FFFD), which keeps `pieces`
# linear in the sequence's length whatever ids a client sends.
MAX_TOKENS_PER_CHARACTER = 4


class TokenText:
    """Decoding (and encoding, with a tokenizer) for one served model."""

    def __init__(self, model_path: str | None) -> None:
        self.tokenizer: Any = None
        # the routes call it from worker threads; a fast tokenizer's Rust state is not to be
        # borrowed by two calls at once ("Already borrowed")
        self._lock = threading.Lock()
        folder = Path(model_path).expanduser() if model_path else None
        if folder is not None and (folder / "tokenizer.json").is_file():
            # the folder's own tokenizer.json, as saved: AutoTokenizer (transformers 5) picks the
            # class from config.json's model type and may rebuild it from files this one lacks
            from transformers import PreTrainedTokenizerFast

            self.tokenizer = PreTrainedTokenizerFast.from_pretrained(str(folder))
        elif folder is not None and any((folder / name).is_file() for name in TOKENIZER_FILES):
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        self._decode = lru_cache(maxsize=1 << 16)(self._decode_uncached)

    @property
    def has_tokenizer(self) -> bool:
        return self.tokenizer is not None

    def decode(self, token_id: int) -> str:
        """One token's text (cached: a top-100 answer decodes the same ids many times)."""
        return self._decode(int(token_id))

    def _decode_uncached(self, token_id: int) -> str:
        if self.tokenizer is None:
            return str(token_id)
        with self._lock:
            return str(self.tokenizer.decode([token_id]))

    def pieces(self, ids: list[int]) -> list[str]:
        """Each token's share of the text of `ids` (see the module docstring)."""
        if self.tokenizer is None:
            return [str(token) for token in ids]
        pieces: list[str] = []
        prefix_start = read_start = 0  # context tokens; tokens whose text is not given out yet
        for end in range(1, len(ids) + 1):
            before = self._decode_span(ids[prefix_start:read_start])
            after = self._decode_span(ids[prefix_start:end])
            waited_enough = end - read_start >= MAX_TOKENS_PER_CHARACTER  # bytes that never form one
            if len(after) > len(before) and (waited_enough or not after.endswith("\ufffd")):
                pieces.append(after[len(before):])
                prefix_start, read_start = read_start, end
            else:  # no complete character yet: the text comes with a later token
                pieces.append("")
        if read_start < len(ids):  # a sequence ending inside a character: its bytes as decoded
            pieces[-1] = self._decode_span(ids[prefix_start:])[len(self._decode_span(ids[prefix_start:read_start])):]
        return pieces

    def _decode_span(self, ids: list[int]) -> str:
        if not ids:
            return ""
        with self._lock:
            return str(self.tokenizer.decode(ids))

    def encode(self, text: str, where: str) -> list[int]:
        """A text prompt's ids, as the tokenizer encodes it (with its special tokens, as vLLM)."""
        if self.tokenizer is None:
            raise InvalidRequest("text prompts need a tokenizer in the checkpoint folder, which has none; "
                                 "send token ids", where)
        with self._lock:
            ids = list(self.tokenizer.encode(text))
        if not ids:
            raise InvalidRequest("the text encodes to no tokens", where)
        return ids
