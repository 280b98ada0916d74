"""Replace selected Linear/Embedding layers by integer-weight ops from `passes/qops.py`.

This module holds the round-to-nearest method (`method = rtn`) and the rewrite every method
shares; `gptq.py` and `awq.py` subclass `QuantizePass` and only choose the integer values
(`_solve`) or the input scaling (`_prepare`), so their output is the same ops and buffers.

Rewrite rules
1. `scheme = int8, mode = dynamic`: `linear(x, W, b)` -> `planc.linear_int8_dynamic(x, Wq, s, b, sat)`,
   Wq int8 symmetric per output channel (`granularity = per_channel`) or per tensor, in the
   weight range of the target CPU (`ctx.cpu`, see `passes/cpu.py`: +-127 where ONNX Runtime's
   integer sums are exact, +-63 where they saturate); `sat` says whether the target's kernel
   saturates, so the op computes what ONNX Runtime will on that CPU.
2. `scheme = int8, mode = static`: observers are inserted on the inputs of the selected Linears,
   the graph runs on the calibration samples (`ctx.load_samples(calibration, samples)`, or the
   example inputs when no loader is given), the observed [min, max] gives a fixed uint8
   (scale, zero_point) per Linear, and the node becomes
   `planc.linear_int8_static(x, x_scale, x_zp, Wq, s, b, sat)`. Observers are removed again.
3. `scheme = int4` (weight-only, group-wise round-to-nearest, symmetric or not):
   `linear` -> `planc.linear_int4(x, packed, scales, zero_points, in, group_size, b)` in
   ONNX Runtime's MatMulNBits layout.
4. A selected `Embedding` (int8 only): `embedding(W, ids)` -> `planc.embedding_int8(ids, Wq, s)`
   with one symmetric scale per row.
5. `smooth = alpha` (SmoothQuant for int8, activation-aware scaling for int4), before rules 1-3: the selected Linears are grouped by
   the node they read; per input channel j, `s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)` from
   the calibration samples (or the example inputs), with `max|W_j|` over the group's weights.
   Each weight column j is multiplied by s_j and the input divided by s_j: folded into the
   producing `layer_norm`'s weight and bias when the group's Linears are its only readers,
   otherwise an explicit `aten.mul(x, 1 / s)` node. In fp32 this is an identity; it moves
   activation outliers (GELU outputs) into the per-channel weight scales (int8), and gives the
   input channels that carry large activations finer int4 steps (int4).
6. The fp32 weight of every rewritten layer is removed from the GraphModule (unless another,
   unselected node still reads it); integer buffers `<module>.qweight`, `<module>.w_scale`
   (`<module>.scales`, `<module>.zero_points` for int4) carry the weights. Biases stay fp32.

Guarantees: no selected layer reads a float weight afterwards; with `method = rtn` every weight
element satisfies the round-to-nearest bound `|w - w_hat| <= scale / 2` (the max error per
layer is reported for every method).
"""

from __future__ import annotations

import logging
from typing import ClassVar

import torch
from torch import fx, nn

import planc.passes.qops as qops
from planc.compiler.model.deferred import ReadBuffers
from planc.passes.base import GraphPass, PassContext, PassError, PassResult
from planc.passes.calibration import load_calibration, observe
from planc.passes.cpu import int8_format
from planc.passes.graph_utils import (
    EmbeddingSite,
    LinearSite,
    copy_meta,
    erase_if_unused,
    get_attr_node,
    get_tensor,
    linear_sites,
    mark,
    scale_columns,
    select_embeddings,
    select_linears,
    set_tensor,
    stored_tensor,
)
from planc.passes.quantize import Quantize
from planc.passes.quantize.weights import WeightFormat, rtn_by_rows

log = logging.getLogger(__name__)

LAYER_NORM = torch.ops.aten.layer_norm.default
MUL = torch.ops.aten.mul.Tensor
#: Floor for channel maxima in the smoothing factors (dead channels keep a finite scale).
SMOOTH_EPS = 1e-5
OP_DYNAMIC = torch.ops.planc.linear_int8_dynamic.default
OP_STATIC = torch.ops.planc.linear_int8_static.default
OP_INT4 = torch.ops.planc.linear_int4.default
OP_EMBEDDING = torch.ops.planc.embedding_int8.default
#: MatMulNBits accepts power-of-two block sizes from 16 up.
MIN_INT4_GROUP = 16
#: What a method chooses for one weight: its integer tensors (keyed as the rewritten op reads
#: them) and the layer's details for the report (at least `max_abs_error`).
Chosen = tuple[dict[str, torch.Tensor], dict]


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


class ChannelMaxObserver(nn.Module):
    """Pass-through module recording max |x| per last-dimension channel."""

    def __init__(self) -> None:
        super().__init__()
        self.amax: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        amax = x.detach().abs().reshape(-1, x.shape[-1]).amax(dim=0).float()
        self.amax = amax if self.amax is None else torch.maximum(self.amax, amax)
        return x


class QuantizePass(GraphPass[Quantize]):
    """See the module docstring for the rewrite rules."""

    #: The `method` option value this class implements (subclasses set theirs).
    method: ClassVar[str] = "rtn"

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        opts = self.options
        if opts.method != self.method:
            raise PassError(f"method = {opts.method} is implemented by {opts.implementation()}: load the pass with passes.registry.load_pass")
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

    @property
    def weight_format(self) -> WeightFormat:
        opts = self.options
        return WeightFormat(opts.scheme, opts.granularity, opts.group_size, opts.symmetric, self._int8.weight_max)

    def _prepare(self, gm: fx.GraphModule, ctx: PassContext, linears: list[LinearSite]) -> dict[str, dict]:
        """Rescale input channels before the weights are chosen (rule 5); {input: how}."""
        return self._smooth(gm, ctx, linears) if self.options.smooth is not None else {}

    def _solve(self, gm: fx.GraphModule, ctx: PassContext, linears: list[LinearSite]) -> dict[str, Chosen]:
        """Integer tensors chosen by the method, per weight, with per-layer details (at least
        `max_abs_error`); rtn rounds each weight when it is packed, so it chooses none here."""
        return {}

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        opts = self.options
        self._int8 = int8_format(ctx.cpu)
        #: What the method adds to the result's details (gptq / awq: seconds, searched alphas).
        self.method_details: dict = {}
        linears = select_linears(gm, ctx.targets)
        embeddings = select_embeddings(gm, ctx.targets)
        smoothed = self._prepare(gm, ctx, linears) if linears else {}
        if smoothed:
            linears = select_linears(gm, ctx.targets)  # the sites now read the smoothed inputs
        solved = self._solve(gm, ctx, linears) if linears else {}
        ranges = self._calibrate(gm, ctx, linears) if opts.mode == "static" else {}
        self._reads = ReadBuffers()  # deferred weights are rounded one at a time
        layers: dict[str, dict] = {}
        packed: dict[str, dict[str, str]] = {}  # weight -> names of its integer tensors
        old_weights: set[str] = set()
        for site in linears:
            if site.weight not in packed:
                packed[site.weight], layers[site.module_path] = self._pack_linear(gm, site.weight, solved.get(site.weight))
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
        del self._reads
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
        if opts.method != "rtn":
            summary = f"{opts.method}: {summary}"
        if smoothed and opts.smooth is not None:
            summary += f"; smoothed {len(smoothed)} input(s) with alpha {opts.smooth}"
        details = {
            "method": opts.method, "scheme": opts.scheme, "mode": opts.mode, "layers": layers,
            "bytes_before": fp_bytes, "bytes_after": q_bytes,
        }
        details.update(self.method_details)
        if opts.scheme == "int8" and linears:
            summary += f"; {self._int8.label} for {self._int8.cpu}"
            details["int8"] = self._int8.as_dict()
        if smoothed:
            details["smooth"] = smoothed
        return PassResult(summary, details)

    def ensures(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        left = [s.module_path for s in select_linears(gm, ctx.targets)]
        left += [s.module_path for s in select_embeddings(gm, ctx.targets)]
        if left:
            raise PassError(f"quantize left float layers in the selection: {left[:3]}")
        for weight in getattr(self, "_rewritten", ()):
            if any(not node.users for node in gm.graph.find_nodes(op="get_attr", target=weight)):
                raise PassError(f"the float weight {weight} was not removed")

    # ------------------------------------------------------------------ weights

    def _pack_linear(self, gm: fx.GraphModule, weight: str, chosen: Chosen | None = None) -> tuple[dict[str, str], dict]:
        """Store the integer tensors of `weight` (`chosen` by the method, else rounded to nearest)."""
        opts = self.options
        stored = stored_tensor(gm, weight)  # a deferred weight's is empty storage: its shape and dtype
        base = weight.rsplit(".", 1)[0]
        info: dict = {"shape": list(stored.shape), "bytes_before": stored.numel() * stored.element_size()}
        if chosen is None:
            w = get_tensor(gm, weight, self._reads).detach().float()
            tensors, info["max_abs_error"] = rtn_by_rows(w, self.weight_format)
            del w  # a deferred weight was read into `_reads` for this call only (`graph_utils.get_tensor`)
        else:
            tensors, details = chosen
            info.update(details)
        # Buffer names: the int4 codes are stored as `qweight` too.
        names = {key: f"{base}.{'qweight' if key == 'packed' else key}" for key in tensors}
        for key, tensor in tensors.items():
            set_tensor(gm, names[key], tensor, buffer=True)
        if opts.scheme == "int4":
            info.update(group_size=opts.group_size, symmetric=opts.symmetric)
        else:
            info.update(granularity=opts.granularity, weight_max=self._int8.weight_max)
        info["bytes_after"] = sum(t.numel() * t.element_size() for t in tensors.values())
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
        saturate = self._int8.arithmetic == "u8s8_sat16"
        if self.options.scheme == "int4":
            in_features = info["shape"][1]
            args = (x, attrs["packed"], attrs["scales"], attrs.get("zero_points"), in_features, self.options.group_size, bias)
            op = OP_INT4
        elif self.options.mode == "static":
            args = (x, info["x_scale"], info["x_zero_point"], attrs["qweight"], attrs["w_scale"], bias, saturate)
            op = OP_STATIC
        else:
            args = (x, attrs["qweight"], attrs["w_scale"], bias, saturate)
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

    # ------------------------------------------------------------------ calibration

    def _samples(self, ctx: PassContext, purpose: str) -> list[dict[str, torch.Tensor]]:
        """The plan's calibration samples, or the example inputs when there is no file or loader."""
        return load_calibration(ctx, self.options.calibration, self.options.calibration_samples, purpose)

    def _calibrate(self, gm: fx.GraphModule, ctx: PassContext, linears: list[LinearSite]) -> dict[str, tuple[float, float]]:
        """Observed [min, max] of each selected Linear's input, keyed by the linear node's name."""
        samples = self._samples(ctx, "static scales")
        observers = observe(gm, samples, [site.input for site in linears], MinMaxObserver)
        unseen = [site.module_path for site in linears if observers[site.input].batches == 0]
        if unseen:
            raise PassError(f"calibration never reached {unseen[:3]}")
        return {site.node.name: (observers[site.input].min, observers[site.input].max) for site in linears}

    # ------------------------------------------------------------------ smoothing

    def _smooth(self, gm: fx.GraphModule, ctx: PassContext, linears: list[LinearSite]) -> dict[str, dict]:
        """SmoothQuant (rule 5), in place; returns {input node: how its factors were applied}."""
        alpha = float(self.options.smooth)  # type: ignore[arg-type]
        groups = self._smoothable(gm, linears)
        observers = observe(gm, self._samples(ctx, "smoothing factors"), list(groups), ChannelMaxObserver)
        done: dict[str, dict] = {}
        for x, sites in groups.items():
            x_max = observers[x].amax
            if x_max is None:
                raise PassError(f"calibration never reached {sites[0].module_path}")
            weights = sorted({site.weight for site in sites})
            w_max = torch.cat([get_tensor(gm, w).detach().float().abs() for w in weights]).amax(dim=0)
            factors = (x_max.clamp(min=SMOOTH_EPS) ** alpha / w_max.clamp(min=SMOOTH_EPS) ** (1 - alpha)).clamp(min=SMOOTH_EPS)
            done[x.name] = self._scale_inputs(gm, x, sites, factors, ctx.source)
        return done

    def _smoothable(self, gm: fx.GraphModule, linears: list[LinearSite]) -> dict[fx.Node, list[LinearSite]]:
        """The selected Linears grouped by input, leaving out groups whose weights other inputs read."""
        groups: dict[fx.Node, list[LinearSite]] = {}
        for site in linears:
            groups.setdefault(site.input, []).append(site)
        readers: dict[str, set[fx.Node]] = {}
        for site in linear_sites(gm):
            readers.setdefault(site.weight, set()).add(site.input)
        for x, sites in list(groups.items()):
            if any(readers[site.weight] != {x} for site in sites):
                log.warning("not smoothing %s: its weights are shared with Linears reading other inputs", sites[0].module_path)
                del groups[x]
        return groups

    def _scale_inputs(self, gm: fx.GraphModule, x: fx.Node, sites: list[LinearSite], factors: torch.Tensor, source: str) -> dict:
        """Multiply the group's weight columns by `factors` and divide its input by them (rule 5)."""
        for w in sorted({site.weight for site in sites}):
            scale_columns(gm, w, factors)
        how = "layer_norm" if self._fold_into_layer_norm(gm, x, sites, factors) else "mul"
        if how == "mul":
            self._insert_divide(gm, x, sites, factors, source)
        return {"layers": [s.module_path for s in sites], "folded_into": how, "max_factor": float(factors.max()), "min_factor": float(factors.min())}

    def _fold_into_layer_norm(self, gm: fx.GraphModule, x: fx.Node, sites: list[LinearSite], factors: torch.Tensor) -> bool:
        """Divide an affine layer_norm's weight and bias by `factors` if only `sites` read it."""
        if x.op != "call_function" or x.target != LAYER_NORM or len(x.args) < 4:
            return False
        if set(x.users) != {site.node for site in sites}:
            return False
        affine = [a for a in x.args[2:4] if isinstance(a, fx.Node) and a.op == "get_attr"]
        if len(affine) != 2 or any(len(a.users) != 1 for a in affine):
            return False
        if any(len(gm.graph.find_nodes(op="get_attr", target=a.target)) != 1 for a in affine):
            return False
        for attr in affine:
            tensor = get_tensor(gm, str(attr.target))
            set_tensor(gm, str(attr.target), (tensor.detach().float() / factors).to(tensor.dtype))
        return True

    def _insert_divide(self, gm: fx.GraphModule, x: fx.Node, sites: list[LinearSite], factors: torch.Tensor, source: str) -> None:
        """x -> mul(x, 1 / factors) for the smoothed Linears only."""
        target = f"{sites[0].module_path}.smooth_inverse"
        set_tensor(gm, target, (1.0 / factors).float(), buffer=True)
        first = min((site.node for site in sites), key=_graph_position(gm))
        inverse = get_attr_node(gm, target, before=first)
        with gm.graph.inserting_before(first):
            scaled = gm.graph.call_function(MUL, (x, inverse))
        copy_meta(scaled, x, source, same_value=True)
        mark(inverse, source)
        for site in sites:
            site.node.replace_input_with(x, scaled)


def _graph_position(gm: fx.GraphModule):
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    return order.__getitem__
