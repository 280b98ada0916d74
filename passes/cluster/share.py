"""Replace selected Linear layers by clustered-weight ops (`planc::linear_clustered`, `ops.py`).

Rewrite rules
1. For each selected `y = linear(x, W, b)` with W [out, in], k-means with `k = 2^bits`
   centroids (`kmeans.py`) runs on every row of W (`granularity = per_channel`) or on all of W
   as one row (`per_tensor`), giving a codebook and one index per weight. With `calibration`,
   the error of W[o, j] is weighted by E[x_j^2] over the calibration samples (plus
   `IMPORTANCE_FLOOR` of its mean, so a channel the samples never excite keeps a usable
   codebook), which approximates the layer's output error by the diagonal of its input Hessian.
2. The node becomes `y = planc.linear_clustered(x, indices, codebook, in, bits, b)`, the indices
   packed into `<module>.cluster_indices` (uint8, `slot_bits(bits)` bits each) and the centroids
   stored as `<module>.codebook` (fp32 [out or 1, k]). A weight read by several selected
   Linears is clustered once.
3. The fp32 weight is removed from the GraphModule unless an unselected node still reads it
   (a tied embedding table keeps its own float copy). Biases stay fp32.

Assumes: every selected weight is finite. Guarantees: no selected Linear reads a float weight
afterwards; each output channel (per_channel) or weight (per_tensor) holds at most 2^bits
distinct values, each the centroid nearest to the original value; the squared error of every
row (weighted, with calibration) is at most that of uniform min-max quantization to 2^bits
levels (reported as `error_vs_uniform`).
"""

from __future__ import annotations

import logging
import time

import torch
from torch import fx, nn

from planc.passes.base import GraphPass, PassContext, PassError, PassResult
from planc.passes.calibration import load_calibration, observe
from planc.passes.cluster import Cluster
from planc.passes.cluster.kmeans import kmeans_rows
from planc.passes.cluster.ops import pack_indices, slot_bits, unpack_indices
from planc.passes.graph_utils import (
    LinearSite,
    copy_meta,
    erase_if_unused,
    get_attr_node,
    get_tensor,
    mark,
    select_linears,
    set_tensor,
)

log = logging.getLogger(__name__)

#: Added to every input channel's E[x^2], as a fraction of their mean.
IMPORTANCE_FLOOR = 0.01


class MeanSquare(nn.Module):
    """Pass-through observer of E[x_j^2] per last-dimension channel (only the Hessian's diagonal:
    a full Gram matrix per input would cost in^2 per layer)."""

    def __init__(self) -> None:
        super().__init__()
        self.total: torch.Tensor | None = None
        self.rows = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.detach().reshape(-1, x.shape[-1]).double()
        total = rows.pow(2).sum(dim=0)
        self.total = total if self.total is None else self.total + total
        self.rows += rows.shape[0]
        return x


#: `ops.py` (imported above) registers it.
OP = torch.ops.planc.linear_clustered.default


class ClusterPass(GraphPass[Cluster]):
    """See the module docstring for the rewrite rules."""

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        linears = select_linears(gm, ctx.targets)
        if not linears:
            raise PassError(f"cluster found no Linear layer in the selection {sorted(ctx.targets)[:5]}")
        bad = sorted({s.module_path for s in linears if not torch.isfinite(get_tensor(gm, s.weight)).all()})
        if bad:
            raise PassError(f"cluster needs finite weights; {bad[:3]} hold NaN or inf")

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        opts = self.options
        started = time.perf_counter()
        layers: dict[str, dict] = {}
        stored: dict[str, tuple[str, str]] = {}  # weight -> (indices, codebook) buffer names
        linears = select_linears(gm, ctx.targets)
        importance = self._importance(gm, ctx, linears) if opts.calibration is not None else {}
        for site in linears:
            if site.weight not in stored:
                stored[site.weight], layers[site.module_path] = self._cluster(gm, site.weight, importance.get(site.weight))
            self._rewrite(gm, site, *stored[site.weight], ctx.source)
        for weight in stored:
            for node in list(gm.graph.find_nodes(op="get_attr", target=weight)):
                erase_if_unused(gm, node)
        self._rewritten = stored
        before = sum(info["bytes_before"] for info in layers.values())
        after = sum(info["bytes_after"] for info in layers.values())
        sse = sum(info["sse"] for info in layers.values())
        uniform = sum(info["uniform_sse"] for info in layers.values())
        seconds = time.perf_counter() - started
        summary = (
            f"clustered {len(linears)} Linear to {2 ** opts.bits} shared values {opts.granularity.replace('_', ' ')}; "
            f"their weights {before / 2**20:.2f} MiB -> {after / 2**20:.2f} MiB; "
            f"{'weighted ' if importance else ''}squared error {sse / uniform if uniform else 0.0:.3f}x "
            f"that of uniform {opts.bits}-bit levels"
        )
        details = {
            "bits": opts.bits,
            "granularity": opts.granularity,
            "layers": layers,
            "bytes_before": before,
            "bytes_after": after,
            "weighted": bool(importance),
            "error_vs_uniform": sse / uniform if uniform else 0.0,
            "seconds": round(seconds, 2),
        }
        return PassResult(summary, details)

    def ensures(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        left = [s.module_path for s in select_linears(gm, ctx.targets)]
        if left:
            raise PassError(f"cluster left float layers in the selection: {left[:3]}")
        levels = 2**self.options.bits
        for weight, (indices, codebook) in getattr(self, "_rewritten", {}).items():
            if any(not node.users for node in gm.graph.find_nodes(op="get_attr", target=weight)):
                raise PassError(f"the float weight {weight} was not removed")
            table, packed = get_tensor(gm, codebook), get_tensor(gm, indices)
            if table.shape[1] != levels or not torch.isfinite(table).all():
                raise PassError(f"the codebook of {weight} is not {levels} finite values per row")
            if int(unpack_indices(packed, self.options.bits, packed.shape[1] * 8 // slot_bits(self.options.bits)).max()) >= levels:
                raise PassError(f"the indices of {weight} point past its {levels}-entry codebook")

    def _importance(self, gm: fx.GraphModule, ctx: PassContext, linears: list[LinearSite]) -> dict[str, torch.Tensor]:
        """E[x_j^2] of each selected weight's input channels on the calibration samples, floored."""
        opts = self.options
        samples = load_calibration(ctx, opts.calibration, opts.calibration_samples, "cluster importance")
        observers = observe(gm, samples, [site.input for site in linears], MeanSquare)
        importance: dict[str, torch.Tensor] = {}
        for site in linears:
            seen = observers[site.input]
            if seen.total is None:
                raise PassError(f"calibration never reached {site.module_path}")
            mean_square = seen.total / seen.rows
            found = mean_square + IMPORTANCE_FLOOR * mean_square.mean()
            importance[site.weight] = found if site.weight not in importance else importance[site.weight] + found
        return importance

    def _cluster(self, gm: fx.GraphModule, weight: str, importance: torch.Tensor | None) -> tuple[tuple[str, str], dict]:
        """Cluster one weight, store its indices and codebook; (buffer names, per-layer details)."""
        opts = self.options
        original = get_tensor(gm, weight).detach()
        w = original.float()
        if importance is not None:
            importance = importance.expand(w.shape)
        if opts.granularity == "per_tensor":
            w, importance = w.reshape(1, -1), None if importance is None else importance.reshape(1, -1)
        clusters = kmeans_rows(w, 2**opts.bits, opts.iterations, importance)
        w = original.float()
        index = clusters.indices.reshape(w.shape)
        packed = pack_indices(index, opts.bits)
        base = weight.rsplit(".", 1)[0]
        names = (f"{base}.cluster_indices", f"{base}.codebook")
        set_tensor(gm, names[0], packed, buffer=True)
        set_tensor(gm, names[1], clusters.codebook.contiguous(), buffer=True)
        w_hat = clusters.reconstruct().reshape(w.shape)
        used = torch.zeros_like(clusters.codebook).scatter_add_(1, clusters.indices.long(), torch.ones(clusters.indices.shape))
        info = {
            "shape": list(w.shape),
            "bytes_before": original.numel() * original.element_size(),
            "bytes_after": packed.numel() + clusters.codebook.numel() * clusters.codebook.element_size(),
            "index_bits": slot_bits(opts.bits),
            "values_used_mean": float((used > 0).sum(dim=1).float().mean()),
            "sse": float(clusters.sse.sum()),
            "uniform_sse": float(clusters.uniform_sse.sum()),
            "relative_error": float(torch.linalg.norm(w - w_hat) / torch.linalg.norm(w).clamp(min=1e-30)),
            "max_abs_error": float((w - w_hat).abs().max()),
            "lloyd_rounds": clusters.rounds,
        }
        log.debug("clustered %s: %s", weight, info)
        return names, info

    def _rewrite(self, gm: fx.GraphModule, site: LinearSite, indices: str, codebook: str, source: str) -> None:
        node = site.node
        x = node.args[0]
        bias = node.args[2] if len(node.args) > 2 else None
        in_features = int(get_tensor(gm, site.weight).shape[1])  # the float weight goes after all rewrites
        index_node = get_attr_node(gm, indices, before=node)
        codebook_node = get_attr_node(gm, codebook, before=node)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(OP, (x, index_node, codebook_node, in_features, self.options.bits, bias))
        copy_meta(new, node, source, same_value=True)
        mark(index_node, source)
        mark(codebook_node, source)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
