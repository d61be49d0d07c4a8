"""A byte-level tokenizer for the built-in random-weight models (no files to download).

Ids 0-255 are the UTF-8 bytes; the Qwen chat and vision special tokens follow from 256.
It has the small part of the Hugging Face tokenizer interface that streampress uses:
``encode``, ``decode``, ``convert_tokens_to_ids``, ``vocab_size``, ``chat_template`` (None:
the adapter's built-in Qwen template is used).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)


class ByteTokenizer:
    """UTF-8 bytes as tokens 0-255, then ``special_tokens`` as single tokens."""

    chat_template = None

    def __init__(self, special_tokens: Iterable[str] = SPECIAL_TOKENS):
        self.special_tokens = tuple(special_tokens)
        self._special_ids = {tok: 256 + i for i, tok in enumerate(self.special_tokens)}
        self._id_to_special = {i: tok for tok, i in self._special_ids.items()}
        pattern = "|".join(re.escape(t) for t in sorted(self.special_tokens, key=len, reverse=True))
        self._split = re.compile(f"({pattern})")

    @property
    def vocab_size(self) -> int:
        return 256 + len(self.special_tokens)

    def __len__(self) -> int:
        return self.vocab_size

    def token_id(self, token: str) -> int:
        if token not in self._special_ids:
            raise ValueError(f"unknown special token {token!r}; known: {list(self.special_tokens)}")
        return self._special_ids[token]

    def convert_tokens_to_ids(self, token: str) -> int:
        return self.token_id(token)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Text -> ids; special-token strings in the text become their single ids."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids: list[int] = []
        for piece in self._split.split(text):
            if piece in self._special_ids:
                ids.append(self._special_ids[piece])
            elif piece:
                ids.extend(piece.encode("utf-8"))
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Ids -> text. Ids outside the vocabulary (a random model may emit any id below its
        ``vocab_size``) are skipped, as are special tokens when ``skip_special_tokens``."""
        out = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                out.append(i)
            elif i in self._id_to_special and not skip_special_tokens:
                out.extend(self._id_to_special[i].encode("utf-8"))
        return out.decode("utf-8", errors="replace")
