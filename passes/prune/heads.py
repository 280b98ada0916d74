"""`prune { method = heads }`: remove whole attention heads (with grouped-query attention,
whole key/value groups: one k/v head and the query heads that read it).

q, k, v (or the slices of a fused qkv projection) lose the head's rows and biases, the
out-projection loses the matching input columns; LayerNorm and the out-projection bias are
untouched. See `passes/prune/structured.py` and `passes/structure.py`."""

from __future__ import annotations

from planc.passes.prune.structured import StructuredPass


class HeadsPass(StructuredPass):
    kind = "attention"
    unit = "heads"
    what = "attention blocks (q/k/v/out projections)"
