"""Text <-> token ids for decoder artifacts: raw UTF-8 bytes, or a Hugging Face `tokenizer.json`.

A decoder artifact names its tokenizer in `decoder.json` (`{"kind": "bytes"}` or
`{"kind": "hf", "path": "tokenizer.json"}`), so generation needs neither transformers nor the
model that was exported. Byte-level is what the example GPT and small GPT-2 configs trained on
bytes use: token id == byte value.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

from planc.compiler.byte_vocab import byte_text

logger = logging.getLogger(__name__)

#: Files of a Hugging Face tokenizer that are copied into an artifact when present.
HF_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
)


class Tokenizer(Protocol):
    """The two calls generation needs."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as token ids, id 0 padding and end of text (`compiler/byte_vocab.py`)."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return byte_text(ids)


class HFTokenizer:
    """A `tokenizers.Tokenizer` loaded from a `tokenizer.json` (fast tokenizer file)."""

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer as _Tokenizer

        self._tok = _Tokenizer.from_file(str(path))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids  # with the special tokens the model was trained with (BOS)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


def load_tokenizer(artifact_dir: str | Path, spec: dict) -> Tokenizer:
    """The tokenizer that `decoder.json`'s `tokenizer` entry names."""
    kind = spec.get("kind")
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "hf":
        path = Path(artifact_dir) / spec["path"]
        if not path.exists():
            raise FileNotFoundError(f"decoder artifact names tokenizer file {path}, which does not exist")
        return HFTokenizer(path)
    raise ValueError(f"unknown tokenizer kind {kind!r} in decoder.json (expected 'bytes' or 'hf')")
