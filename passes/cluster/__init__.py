"""The cluster pass: weight sharing by k-means, each weight replaced by its cluster's centroid.

Every selected Linear keeps only `2^bits` distinct values per output channel (or per tensor):
a small float codebook and one `bits`-bit index per weight (`kmeans.py` finds them, `share.py`
rewrites the graph into `planc::linear_clustered`, the op of `ops.py`). Unlike integer
quantization the levels need not be evenly spaced, so they follow the bell shape of trained
weights (Han et al. 2016, "Deep compression", stage 2: trained quantization and weight sharing).

This module is the pass's option model (torch-free, so `planc check` stays light).
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from planc.passes.options import PassOptions


class Cluster(PassOptions):
    """Replace each selected Linear's weights by the centroids of a 1-D k-means on them."""

    name: ClassVar[str] = "cluster"
    impl: ClassVar[str] = "planc.passes.cluster.share:ClusterPass"
    #: Index width: at most 2^bits shared values per codebook (indices are packed 1, 2, 4 or 8
    #: bits wide: 3 bits take a 4-bit slot, 5 to 7 bits a byte).
    bits: int = Field(4, ge=1, le=8)
    #: per_channel: one codebook per output row (the row's own value distribution, 2^bits fp32
    #: values per row); per_tensor: one codebook for the whole weight.
    granularity: Literal["per_channel", "per_tensor"] = "per_channel"
    #: Lloyd iterations at most (each never increases the squared error; it stops earlier once
    #: no assignment changes).
    iterations: int = Field(50, ge=1, le=1000)
    #: Text file (one sample per line). With it, each weight's squared error is weighted by the
    #: mean square of the input channel it multiplies (the diagonal of the layer's input Hessian
    #: E[x_j^2], the sensitivity SqueezeLLM's weighted k-means uses, Kim et al. 2023), so the
    #: codebook spends its levels where the layer's output feels them. Without it, every weight
    #: counts alike.
    calibration: str | None = None
    calibration_samples: int = Field(32, ge=1)
