"""The share pass: grouped-query (or multi-query) attention from multi-head attention (`gqa.py`).

This module is the pass's option model (torch-free, so `planc check` stays light).

Unlike the graph passes, share changes the model's architecture (the key/value projections
and the cache shrink), so it rewrites the EAGER model right after loading, before anything is
captured (`rewrites_model`): the compiler's driver applies it in `load_model`, so the ONNX
export (a decoder's key/value-cache graph included) and every later pass see the grouped
model; the training program applies the same `gqa.py` (copied into planc_runtime at emit) to its
student after copying the unmodified teacher, so `target train { distill { } }` uptrains the
grouped model against the original; the compile after training rebuilds the grouped model the
same way and loads the trained weights into it.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from planc.passes.options import PassOptions


class Share(PassOptions):
    """Share each group of key/value heads among its query heads: mean-pool the group's key and
    value projections (Ainslie et al. 2023); `kv_heads = 1` is multi-query attention."""

    name: ClassVar[str] = "share"
    impl: ClassVar[str] = "planc.passes.share.gqa:ShareKVHeads"
    default_types: ClassVar[tuple[str, ...]] = ()  # every attention layer of the model
    rewrites_model: ClassVar[bool] = True
    #: Key/value heads per layer after sharing; must divide the model's (key/value) head count.
    kv_heads: int = Field(ge=1)
