"""Byte-level UTF-8 tokenizer.

Token ids:
    0-255  the byte with that value
    256    <bos>, absorbed by every new session and at the start of every training document
    257    <eos>, ends a training document; generation stops when it is sampled

Text is encoded as its UTF-8 bytes, so any string round-trips. Decoding is incremental:
`IncrementalDecoder` holds back the bytes of a character until it is complete, so a stream
never shows half a character, and replaces invalid bytes with U+FFFD deterministically
(Python's UTF-8 decoder with errors="replace", one U+FFFD per maximal invalid subpart).
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable

BYTE_TOKENS = 256
BOS = 256
EOS = 257
VOCAB_SIZE = 258
SPECIAL_TOKENS = {"<bos>": BOS, "<eos>": EOS}


def encode(text: str) -> list[int]:
    """The token ids of `text`: its UTF-8 bytes."""
    return list(text.encode("utf-8"))


def decode(tokens: Iterable[int]) -> str:
    """The text of a whole token sequence; special tokens produce no text."""
    decoder = IncrementalDecoder()
    return "".join(decoder.push(t) for t in tokens) + decoder.flush()


def is_special(token: int) -> bool:
    return token >= BYTE_TOKENS


def check_token(token: int) -> None:
    """Raise ValueError unless `token` is a valid id."""
    if not 0 <= token < VOCAB_SIZE:
        raise ValueError(f"token id {token} is out of range: ids are 0-{VOCAB_SIZE - 1}")


class IncrementalDecoder:
    """Turns a token stream into text pieces made of whole characters only."""

    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        """The text completed by `token` ("" while a character is still incomplete).

        A special token ends any incomplete character first (it becomes U+FFFD).
        """
        check_token(token)
        if is_special(token):
            return self.flush()
        return self._utf8.decode(bytes((token,)))

    def flush(self) -> str:
        """Whatever is pending, with an incomplete character replaced by U+FFFD."""
        return self._utf8.decode(b"", final=True)

    @property
    def pending(self) -> bool:
        """True while the bytes of an incomplete character are held back."""
        return bool(self._utf8.getstate()[0])
