"""The byte vocabulary of the example GPT, one rule for the compiler and the decoder runtime.

Token id == UTF-8 byte value (ids 0..255). Id 0 (NUL) is reserved: it pads a batch and ends a
text, like a Hugging Face tokenizer's special tokens, so turning ids back into text leaves it
out. Torch-free, so the generation runtime (numpy and ONNX Runtime only) reads it too.
"""

from __future__ import annotations

from collections.abc import Iterable

#: Number of byte ids.
BYTE_VOCAB_SIZE = 256
#: The padding and end-of-text id.
BYTE_PAD_ID = 0


def byte_text(ids: Iterable[int]) -> str:
    """Text of byte ids: padding / end-of-text and out-of-range ids left out, invalid UTF-8 as U+FFFD."""
    return bytes(i for i in ids if BYTE_PAD_ID < i < BYTE_VOCAB_SIZE).decode("utf-8", errors="replace")
