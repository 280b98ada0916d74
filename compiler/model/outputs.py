"""Samples from text files, and the one tensor verification compares (embeddings or logits)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import torch
import torch.fx
import torch.nn.functional as F


logger = logging.getLogger(__name__)


from planc.compiler import textdata
from planc.compiler.model.common import FrontendError, logger, primary_output
from planc.compiler.model.load import LoadedModel



def load_samples(
    loaded: LoadedModel, path: str | Path, count: int | None, seq: int | None = None
) -> list[dict[str, torch.Tensor]]:
    """Up to `count` (None: all) samples from a text file (one per non-blank line), each a batch of one.

    A relative `path` resolves against the plan's directory. With `seq`, every sample is padded
    (left for decoders) or truncated to exactly `seq` tokens. `path = "stdlib"` gives windows
    of the standard library's sources, as the training target reads them (`stdlib_windows`).
    """
    if str(path) == textdata.STDLIB:
        return stdlib_windows(loaded, count or textdata.STDLIB_WINDOWS, seq or textdata.STDLIB_WINDOW)
    file = Path(path)
    if not file.is_absolute():
        file = loaded.source.base_dir / file
    if not file.is_file():
        raise FrontendError(f"sample file '{path}' not found (looked for {file})")
    try:
        lines = [line.strip() for line in file.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as error:
        raise FrontendError(f"cannot read sample file '{path}': {error}") from error
    texts = [line for line in lines if line][:count]
    if not texts:
        raise FrontendError(f"sample file '{path}' has no non-blank lines")
    if count is not None and len(texts) < count:
        logger.warning("sample file '%s' has %d samples, %d were asked for", path, len(texts), count)
    pad_left = loaded.task == "causal_lm"
    return [loaded.tokenizer.encode_batch([text], seq=seq, pad_left=pad_left) for text in texts]


def stdlib_windows(loaded: LoadedModel, count: int, window: int) -> list[dict[str, torch.Tensor]]:
    """`count` windows of `window` tokens cut evenly from the standard library's sources."""
    text = textdata.stdlib_text(max(1 << 20, count * window * 8))
    step = max(1, (len(text) - window * 4) // count)
    chunks = [text[start : start + window * 4] for start in range(0, step * count, step)]
    pad_left = loaded.task == "causal_lm"
    return [loaded.tokenizer.encode_batch([chunk], seq=window, pad_left=pad_left) for chunk in chunks]


def _wide(tensor: torch.Tensor) -> torch.Tensor:
    """fp32 for any lower precision; float64 stays float64 (the mixed-precision search scores in it)."""
    return tensor if tensor.dtype == torch.float64 else tensor.float()


def embed(outputs: Any, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sentence embeddings: hidden states mean-pooled over real tokens, L2-normalized [batch, hidden]
    (fp32, or float64 from a float64 graph)."""
    hidden = _wide(primary_output(outputs))
    if hidden.dim() == 2:
        return F.normalize(hidden, p=2, dim=-1)
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    return F.normalize(pooled, p=2, dim=-1)


def model_output(loaded: LoadedModel, module: Callable[..., Any], inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """What verification compares, for the eager model or any graph of it: embeddings for
    encoders, logits for causal LMs (fp32, or float64 from a float64 graph)."""
    with torch.no_grad():
        outputs = module(**inputs)
    if loaded.task == "causal_lm":
        return _wide(primary_output(outputs))
    mask = inputs.get("attention_mask")
    if mask is None:
        mask = torch.ones(inputs["input_ids"].shape[:2], dtype=torch.int64)
    return embed(outputs, mask)
