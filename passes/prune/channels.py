"""`prune { method = channels }`: remove MLP intermediate channels.

The up-projection(s) (and a gate multiplied elementwise with it) lose the channel's rows and
biases, the down-projection loses the matching input columns, across any elementwise
activation. See `passes/prune/structured.py` and `passes/structure.py`."""

from __future__ import annotations

from planc.passes.prune.structured import StructuredPass


class ChannelsPass(StructuredPass):
    kind = "mlp"
    unit = "channels"
    what = "MLP blocks"
