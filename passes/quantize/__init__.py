"""The quantize pass, one class per method (the registry picks it from `Quantize.implementation()`):

- `rtn`: round-to-nearest, and the rewrite into integer ops every method shares (`rtn.py`);
- `gptq`: error-compensating rounding on the layer inputs' Hessian (`gptq.py`);
- `awq`: activation-aware input scaling with a searched strength (`awq.py`).

The stored integer layouts live in `weights.py` (formats of `passes/qops.py`); the calibration
captures in `passes/calibration.py`.
"""

from __future__ import annotations

from planc.passes.quantize.rtn import (
    OP_DYNAMIC,
    OP_EMBEDDING,
    OP_INT4,
    OP_STATIC,
    ChannelMaxObserver,
    MinMaxObserver,
    QuantizePass,
)

__all__ = ["OP_DYNAMIC", "OP_EMBEDDING", "OP_INT4", "OP_STATIC", "ChannelMaxObserver", "MinMaxObserver", "QuantizePass"]
