"""Replace selected Linear/Embedding layers by integer-weight ops from `passes/qops.py`.

Rewrite rules
1. `scheme = int8, mode = dynamic`: `linear(x, W, b)` -> `planc.linear_int8_dynamic(x, Wq, s, b)`,
   Wq int8 symmetric per output channel (`granularity = per_channel`) or per tensor.
2. `scheme = int8, mode = static`: observers are inserted on the inputs of the selected Linears,
   the graph runs on the calibration samples (`ctx.load_samples(calibration, samples)`, or the
   example inputs when no loader is given), the observed [min, max] gives a fixed uint8
   (scale, zero_point) per Linear, and the node becomes
   `planc.linear_int8_static(x, x_scale, x_zp, Wq, s, b)`. Observers are removed again.
3. `scheme = int4` (weight-only, group-wise round-to-nearest, symmetric or not):
   `linear` -> `planc.linear_int4(x, packed, scales, zero_points, in, group_size, b)` in
   ONNX Runtime's MatMulNBits layout.
4. A selected `Embedding` (int8 only): `embedding(W, ids)` -> `planc.embedding_int8(ids, Wq, s)`
   with one symmetric scale per row.
5. The fp32 weight of every rewritten layer is removed from the GraphModule (unless another,
   unselected node still reads it); integer buffers `<module>.qweight`, `<module>.w_scale`
   (`<module>.scales`, `<module>.zero_points` for int4) carry the weights. Biases stay fp32.

Guarantees: no selected layer reads a float weight afterwards; every weight element satisfies
the round-to-nearest bound `|w - w_hat| <= scale / 2` (reported as the max error per layer).
"""

from __future__ import annotations

import logging

import torch
from torch import fx, nn

import passes.qops as qops
from passes.base import GraphPass, PassContext, PassError, PassResult
from passes.graph_utils import (
    EmbeddingSite,
    LinearSite,
    copy_meta,
    erase_if_unused,
    get_attr_node,
    get_tensor,
    mark,
    select_embeddings,
    select_linears,
    set_tensor,
)
from passes.options import Quantize

log = logging.getLogger(__name__)

OP_DYNAMIC = torch.ops.planc.linear_int8_dynamic.default
OP_STATIC = torch.ops.planc.linear_int8_static.default
OP_INT4 = torch.ops.planc.linear_int4.default
OP_EMBEDDING = torch.ops.planc.embedding_int8.default
#: MatMulNBits accepts power-of-two block sizes from 16 up.
MIN_INT4_GROUP = 16


class MinMaxObserver(nn.Module):
    """Pass-through module recording the running min and max of what flows through it."""

    def __init__(self) -> None:
        super().__init__()
        self.min = float("inf")
        self.max = float("-inf")
        self.batches = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.min = min(self.min, float(x.detach().min()))
        self.max = max(self.max, float(x.detach().max()))
        self.batches += 1
        return x


class QuantizePass(GraphPass[Quantize]):
    """See the module docstring for the rewrite rules."""

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        opts = self.options
        if opts.scheme == "int8" and opts.mode == "weight_only":
            raise PassError("int8 weight-only is not supported: use mode = dynamic or static, or scheme = int4")
        if opts.scheme == "int8" and not opts.symmetric:
            raise PassError("int8 weights are always symmetric (zero point 0); symmetric = false applies to int4")
        if opts.scheme == "int4" and opts.granularity != "per_group":
            raise PassError("int4 is group-wise: use granularity = per_group")
        if opts.scheme == "int4" and opts.group_size < MIN_INT4_GROUP:
            raise PassError(f"int4 group_size must be at least {MIN_INT4_GROUP} (ONNX Runtime MatMulNBits)")
        linears = select_linears(gm, ctx.targets)
        embeddings = select_embeddings(gm, ctx.targets)
        if not linears and not embeddings:
            raise PassError(f"quantize found no Linear or Embedding layer in the selection {sorted(ctx.targets)[:5]}")
        if embeddings and opts.scheme != "int8":
            paths = sorted({site.module_path for site in embeddings})
            raise PassError(f"only int8 embeddings are supported; {paths[:3]} were selected for {opts.scheme}")

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        opts = self.options
        linears = select_linears(gm, ctx.targets)
        embeddings = select_embeddings(gm, ctx.targets)
        ranges = self._calibrate(gm, ctx, linears) if opts.mode == "static" else {}
        layers: dict[str, dict] = {}
        packed: dict[str, dict[str, str]] = {}  # weight -> names of its integer tensors
        old_weights: set[str] = set()
        for site in linears:
            if site.weight not in packed:
                packed[site.weight], layers[site.module_path] = self._pack_linear(gm, site.weight)
            info = layers.setdefault(site.module_path, {})
            if opts.mode == "static":
                x_scale, x_zp = qops.quantize_activation_params(*ranges[site.node.name])
                info.update(x_min=ranges[site.node.name][0], x_max=ranges[site.node.name][1], x_scale=x_scale, x_zero_point=x_zp)
            self._rewrite_linear(gm, site, packed[site.weight], info, ctx.source)
            old_weights.add(site.weight)
        for site in embeddings:
            if site.weight not in packed:
                packed[site.weight], layers[site.module_path] = self._pack_embedding(gm, site.weight)
            self._rewrite_embedding(gm, site, packed[site.weight], ctx.source)
            old_weights.add(site.weight)
        for weight in old_weights:
            for node in list(gm.graph.find_nodes(op="get_attr", target=weight)):
                erase_if_unused(gm, node)
        self._rewritten = old_weights
        fp_bytes = sum(info["bytes_before"] for info in layers.values())
        q_bytes = sum(info["bytes_after"] for info in layers.values())
        kind = f"{opts.scheme} {opts.mode}" + (f" g{opts.group_size}" if opts.scheme == "int4" else "")
        summary = (
            f"quantized {len(linears)} Linear + {len(embeddings)} Embedding to {kind}; "
            f"their weights {fp_bytes / 2**20:.2f} MiB -> {q_bytes / 2**20:.2f} MiB"
        )
        return PassResult(summary, {"scheme": opts.scheme, "mode": opts.mode, "layers": layers, "bytes_before": fp_bytes, "bytes_after": q_bytes})

    def ensures(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        left = [s.module_path for s in select_linears(gm, ctx.targets)]
        left += [s.module_path for s in select_embeddings(gm, ctx.targets)]
        if left:
            raise PassError(f"quantize left float layers in the selection: {left[:3]}")
        for weight in getattr(self, "_rewritten", ()):
            if any(not node.users for node in gm.graph.find_nodes(op="get_attr", target=weight)):
                raise PassError(f"the float weight {weight} was not removed")

    # ------------------------------------------------------------------ weights

    def _pack_linear(self, gm: fx.GraphModule, weight: str) -> tuple[dict[str, str], dict]:
        opts = self.options
        w = get_tensor(gm, weight).detach().float()
        base = weight.rsplit(".", 1)[0]
        info: dict = {"shape": list(w.shape), "bytes_before": w.numel() * get_tensor(gm, weight).element_size()}
        if opts.scheme == "int4":
            packed, scales, zero_points = qops.pack_int4(w, opts.group_size, opts.symmetric)
            names = {"packed": f"{base}.qweight", "scales": f"{base}.scales"}
            set_tensor(gm, names["packed"], packed, buffer=True)
            set_tensor(gm, names["scales"], scales, buffer=True)
            if zero_points is not None:
                names["zero_points"] = f"{base}.zero_points"
                set_tensor(gm, names["zero_points"], zero_points, buffer=True)
            w_hat = qops.unpack_int4(packed, scales, zero_points, w.shape[1], opts.group_size)
            stored = [packed, scales] + ([zero_points] if zero_points is not None else [])
            info.update(group_size=opts.group_size, symmetric=opts.symmetric)
        else:
            if opts.granularity == "per_tensor":
                q, scale = qops.quantize_per_tensor_int8(w)
            else:
                q, scale = qops.quantize_per_channel_int8(w)
            names = {"qweight": f"{base}.qweight", "w_scale": f"{base}.w_scale"}
            set_tensor(gm, names["qweight"], q, buffer=True)
            set_tensor(gm, names["w_scale"], scale, buffer=True)
            w_hat = q.float() * (scale[:, None] if scale.numel() > 1 else scale)
            stored = [q, scale]
            info.update(granularity=opts.granularity)
        info["bytes_after"] = sum(t.numel() * t.element_size() for t in stored)
        info["max_abs_error"] = float((w - w_hat).abs().max())
        return names, info

    def _pack_embedding(self, gm: fx.GraphModule, weight: str) -> tuple[dict[str, str], dict]:
        w = get_tensor(gm, weight).detach().float()
        base = weight.rsplit(".", 1)[0]
        q, scale = qops.quantize_per_channel_int8(w)
        names = {"qweight": f"{base}.qweight", "scale": f"{base}.w_scale"}
        set_tensor(gm, names["qweight"], q, buffer=True)
        set_tensor(gm, names["scale"], scale, buffer=True)
        info = {
            "shape": list(w.shape),
            "bytes_before": w.numel() * get_tensor(gm, weight).element_size(),
            "bytes_after": q.numel() + scale.numel() * 4,
            "max_abs_error": float((w - q.float() * scale[:, None]).abs().max()),
        }
        return names, info

    # ------------------------------------------------------------------ graph

    def _rewrite_linear(self, gm: fx.GraphModule, site: LinearSite, names: dict[str, str], info: dict, source: str) -> None:
        node = site.node
        x = node.args[0]
        bias = node.args[2] if len(node.args) > 2 else None
        attrs = {key: get_attr_node(gm, target, before=node) for key, target in names.items()}
        if self.options.scheme == "int4":
            in_features = info["shape"][1]
            args = (x, attrs["packed"], attrs["scales"], attrs.get("zero_points"), in_features, self.options.group_size, bias)
            op = OP_INT4
        elif self.options.mode == "static":
            args = (x, info["x_scale"], info["x_zero_point"], attrs["qweight"], attrs["w_scale"], bias)
            op = OP_STATIC
        else:
            args = (x, attrs["qweight"], attrs["w_scale"], bias)
            op = OP_DYNAMIC
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(op, args)
        copy_meta(new, node, source, same_value=True)
        for attr in attrs.values():
            mark(attr, source)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)

    def _rewrite_embedding(self, gm: fx.GraphModule, site: EmbeddingSite, names: dict[str, str], source: str) -> None:
        node = site.node
        qweight = get_attr_node(gm, names["qweight"], before=node)
        scale = get_attr_node(gm, names["scale"], before=node)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(OP_EMBEDDING, (node.args[1], qweight, scale))
        copy_meta(new, node, source, same_value=True)
        mark(qweight, source)
        mark(scale, source)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)

    def _calibrate(self, gm: fx.GraphModule, ctx: PassContext, linears: list[LinearSite]) -> dict[str, tuple[float, float]]:
        """Observed [min, max] of each selected Linear's input, keyed by the linear node's name."""
        opts = self.options
        if ctx.load_samples is not None and opts.calibration is not None:
            samples = ctx.load_samples(opts.calibration, opts.calibration_samples)
        else:
            log.warning("no calibration loader: calibrating static scales on the example inputs")
            samples = [ctx.example_inputs]
        if not samples:
            raise PassError(f"calibration file {opts.calibration!r} gave no samples")
        observers: dict[fx.Node, MinMaxObserver] = {}
        inserted: list[fx.Node] = []
        for site in linears:
            source = site.input
            if source in observers:
                continue
            name = f"planc_observer_{len(observers)}"
            observers[source] = MinMaxObserver()
            gm.add_submodule(name, observers[source])
            with gm.graph.inserting_after(source):
                inserted.append(gm.graph.call_module(name, (source,)))
        gm.recompile()
        try:
            with torch.no_grad():
                for sample in samples:
                    gm(**sample)
        finally:
            for node in inserted:
                gm.graph.erase_node(node)
                delattr(gm, str(node.target))
            gm.recompile()
        unseen = [site.module_path for site in linears if observers[site.input].batches == 0]
        if unseen:
            raise PassError(f"calibration never reached {unseen[:3]}")
        return {site.node.name: (observers[site.input].min, observers[site.input].max) for site in linears}
