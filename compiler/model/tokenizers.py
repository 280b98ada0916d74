"""Text -> the model's declared inputs, and ids -> text: UTF-8 bytes or a Hugging Face tokenizer."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from planc.compiler.byte_vocab import BYTE_PAD_ID, BYTE_VOCAB_SIZE, byte_text
from planc.compiler.ir import InputSpec
from planc.compiler.model.common import DTYPES, FrontendError

class Tokenizer(ABC):
    """Text to the model's declared inputs, and ids back to text.

    Subclasses only split text into ids; this base class assembles exactly the inputs the plan
    declares (ids, mask, token types, positions) in the declared dtypes.
    """

    pad_id: int
    eos_id: int | None
    vocab_size: int

    def __init__(self, inputs: tuple[InputSpec, ...], max_length: int | None) -> None:
        self.inputs = inputs
        #: Longest sequence the model accepts; longer texts are truncated.
        self.max_length = max_length

    @abstractmethod
    def _encode(self, texts: list[str], seq: int | None, pad_left: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), both int64 [len(texts), seq or longest]."""

    @abstractmethod
    def decode(self, ids: torch.Tensor | list[int]) -> str:
        """Text of a row of ids, padding and special tokens left out."""

    def encode_batch(self, texts: list[str], seq: int | None = None, pad_left: bool = False) -> dict[str, torch.Tensor]:
        """Tokenize `texts` into the declared inputs, padded to `seq` (or the longest text).

        `pad_left` puts padding before the text, as decoders want for generation.
        """
        if not texts:
            raise FrontendError("cannot tokenize an empty list of texts")
        if seq is not None and seq < 1:
            raise FrontendError(f"sequence length must be at least 1, got {seq}")
        ids, mask = self._encode(list(texts), seq, pad_left)
        produced = {
            "input_ids": ids,
            "attention_mask": mask,
            "token_type_ids": torch.zeros_like(ids),
            "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
        }
        return {spec.name: produced[spec.name].to(DTYPES[spec.dtype]) for spec in self.inputs}

    def _limit(self, seq: int | None) -> int | None:
        if seq is not None and self.max_length is not None and seq > self.max_length:
            raise FrontendError(f"sequence length {seq} exceeds the model's maximum of {self.max_length} positions")
        return seq if seq is not None else self.max_length


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255, the tokenizer of the example GPT. Id 0 (NUL) pads and ends
    text (`compiler/byte_vocab.py`)."""

    pad_id = BYTE_PAD_ID
    eos_id = BYTE_PAD_ID
    vocab_size = BYTE_VOCAB_SIZE

    def _encode(self, texts: list[str], seq: int | None, pad_left: bool) -> tuple[torch.Tensor, torch.Tensor]:
        limit = self._limit(seq)
        rows = [list(text.encode("utf-8"))[:limit] for text in texts]
        width = seq if seq is not None else max(len(row) for row in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.int64)
        mask = torch.zeros((len(rows), width), dtype=torch.int64)
        for i, row in enumerate(rows):
            if not row:
                continue
            span = slice(width - len(row), width) if pad_left else slice(0, len(row))
            ids[i, span] = torch.tensor(row, dtype=torch.int64)
            mask[i, span] = 1
        return ids, mask

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        return byte_text(ids.tolist() if isinstance(ids, torch.Tensor) else ids)


class HFTokenizer(Tokenizer):
    """A Hugging Face model's own tokenizer files, loaded offline."""

    def __init__(self, tokenizer: Any, inputs: tuple[InputSpec, ...], max_length: int | None) -> None:
        super().__init__(inputs, max_length)
        self.hf = tokenizer
        if tokenizer.pad_token_id is None:
            # Decoders such as GPT-2 ship without a pad token: pad with end-of-text, masked out.
            if tokenizer.eos_token is None:
                raise FrontendError("the model's tokenizer defines neither a pad nor an end-of-text token")
            tokenizer.pad_token = tokenizer.eos_token
        self.pad_id = int(tokenizer.pad_token_id)
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        self.eos_id = None if eos is None else int(eos)
        self.vocab_size = len(tokenizer)

    def _encode(self, texts: list[str], seq: int | None, pad_left: bool) -> tuple[torch.Tensor, torch.Tensor]:
        limit = self._limit(seq)
        encoded = self.hf(
            texts,
            padding="max_length" if seq is not None else "longest",
            truncation=limit is not None,
            max_length=limit,
            padding_side="left" if pad_left else "right",
            return_attention_mask=True,
            return_tensors="pt",
        )
        return encoded["input_ids"].to(torch.int64), encoded["attention_mask"].to(torch.int64)

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return self.hf.decode(values, skip_special_tokens=True)


