"""Run the selected part of the graph in fp16/bf16, keeping fragile op kinds in fp32.

Every node is first classified (dtypes come from one run on the example inputs):
- *low*: an fp32-producing op inside the selection (no selector: the whole model) with at
  least one floating input, and not of a kept kind;
- *fp32*: kept kinds (`keep_fp32`: layernorm, softmax, embedding, loss, pooling; pooling
  also covers every op inside a module whose class name contains "Pool", e.g. BertPooler),
  ops outside the selection, and ops that create floats from nothing (arange, full, ...);
- *follow*: pure data movement (view, reshape, transpose, slice, dropout, getitem, ...),
  which takes whatever dtype its input has;
- *fixed*: explicit dtype conversions already in the model, and non-float results.

Rewrite rules
1. A float parameter/buffer read only by *low* nodes is converted to the low dtype in place.
2. A floating input of a *low* node that is not in the low dtype gets one cast
   (`aten._to_copy`) to it; a floating input of an *fp32* node that is not fp32 gets one cast
   back. Casts are shared per (value, dtype), so each boundary has at most one cast, and a
   cast never reads another cast (an existing fp32->x conversion is bypassed).
3. Graph outputs that changed dtype are cast back, so inputs and outputs keep their dtypes.

Fused `scaled_dot_product_attention` counts as a low op: its kernels accumulate the softmax in
fp32. Guarantees: kept ops see fp32 inputs, outputs keep their original dtypes, no cast feeds a cast.
"""

from __future__ import annotations

import logging
import operator

import torch
from torch import fx

from planc.passes.base import GraphPass, PassContext, PassError, PassResult
from planc.passes.graph_utils import get_tensor, mark, module_stack, owner_path, record_shapes, set_tensor, within_any
from planc.passes.cast import Cast

log = logging.getLogger(__name__)

LOW_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
CAST = torch.ops.aten._to_copy.default


def _packets(namespace: object, *names: str) -> frozenset:
    found = set()
    for name in names:
        try:
            found.add(getattr(namespace, name))
        except (AttributeError, RuntimeError):
            continue
    return frozenset(found)


KEEP_OPS: dict[str, frozenset] = {
    "layernorm": _packets(torch.ops.aten, "layer_norm", "native_layer_norm", "rms_norm", "group_norm"),
    "softmax": _packets(torch.ops.aten, "softmax", "_softmax", "log_softmax", "_log_softmax", "_safe_softmax"),
    "embedding": _packets(torch.ops.aten, "embedding", "embedding_bag") | _packets(torch.ops.planc, "embedding_int8"),
    "loss": _packets(
        torch.ops.aten,
        "cross_entropy_loss", "nll_loss", "nll_loss_forward", "nll_loss2d_forward", "mse_loss", "l1_loss",
        "smooth_l1_loss", "huber_loss", "binary_cross_entropy", "binary_cross_entropy_with_logits", "kl_div",
    ),
    "pooling": _packets(
        torch.ops.aten,
        "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
        "_adaptive_avg_pool2d", "max_pool1d", "max_pool2d", "max_pool2d_with_indices",
        "adaptive_max_pool1d", "adaptive_max_pool2d",
    ),
}
FOLLOW_OPS = _packets(
    torch.ops.aten,
    "view", "reshape", "_unsafe_view", "transpose", "permute", "t", "unsqueeze", "squeeze", "expand",
    "expand_as", "view_as", "reshape_as", "slice", "select", "contiguous", "clone", "alias", "detach",
    "dropout", "flatten", "unflatten", "split", "split_with_sizes", "chunk", "unbind", "narrow",
    "movedim", "repeat",
) | {operator.getitem}
CONVERT_OPS = _packets(torch.ops.aten, "to", "_to_copy") | _packets(torch.ops.prims, "convert_element_type")


def _packet(node: fx.Node) -> object:
    target = node.target
    return getattr(target, "overloadpacket", target)


def _is_float(node: object) -> bool:
    return isinstance(node, fx.Node) and node.meta.get("planc_dtype") in (torch.float32, torch.float16, torch.bfloat16)


class CastPass(GraphPass[Cast]):
    """See the module docstring for the rewrite rules."""

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        if any(name.startswith("submod_") for name, _ in gm.named_children()):
            raise PassError("cast must run before partition")

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        low = LOW_DTYPES[self.options.dtype]
        record_shapes(gm, ctx.example_inputs)
        whole = not ctx.targets or "" in ctx.targets
        domains = {node: self._domain(node, whole, ctx.targets) for node in gm.graph.nodes}
        self._original_outputs = [n.meta.get("planc_dtype") for n in self._outputs(gm)]

        converted = []
        new_dtype: dict[fx.Node, torch.dtype | None] = {}
        for node in gm.graph.find_nodes(op="get_attr"):
            new_dtype[node] = node.meta.get("planc_dtype")
            if node.meta.get("planc_dtype") == torch.float32 and node.users and all(domains[u] == "low" for u in node.users):
                set_tensor(gm, str(node.target), get_tensor(gm, str(node.target)).detach().to(low))
                new_dtype[node] = low
                mark(node, ctx.source)
                converted.append(str(node.target))

        casts: dict[tuple[fx.Node, torch.dtype], fx.Node] = {}

        def cast(value: fx.Node, dtype: torch.dtype, before: fx.Node) -> fx.Node:
            # Read through an existing float conversion instead of stacking a cast on it.
            while _packet(value) in CONVERT_OPS and _is_float(value.args[0]):
                value = value.args[0]
                if new_dtype.get(value) == dtype:
                    return value
            key = (value, dtype)
            if key not in casts:
                with gm.graph.inserting_before(before):  # first consumer: valid for later ones
                    node = gm.graph.call_function(CAST, (value,), {"dtype": dtype})
                node.meta.update(planc_cast=True, planc_dtype=dtype)
                if "nn_module_stack" in before.meta:
                    node.meta["nn_module_stack"] = before.meta["nn_module_stack"]
                casts[key] = mark(node, ctx.source)
                new_dtype[node] = dtype
            return casts[key]

        n_low = 0
        for node in list(gm.graph.nodes):
            domain = domains.get(node)
            if node.op in ("placeholder",) or domain in ("fixed", "none"):
                new_dtype[node] = node.meta.get("planc_dtype")
            elif node.op == "get_attr":
                continue
            elif node.op == "output":
                self._cast_outputs(gm, node, new_dtype, cast)
            elif domain == "follow":
                source = next((n for n in node.all_input_nodes if _is_float(n)), None)
                new_dtype[node] = new_dtype.get(source, node.meta.get("planc_dtype"))
            else:
                want = low if domain == "low" else torch.float32
                for arg in node.all_input_nodes:
                    if _is_float(arg) and new_dtype.get(arg) != want:
                        node.replace_input_with(arg, cast(arg, want, node))
                new_dtype[node] = want
                if domain == "low":
                    n_low += 1
                    mark(node, ctx.source)
        self._low_nodes = n_low
        details = {
            "dtype": self.options.dtype,
            "low_nodes": n_low,
            "casts": len(casts),
            "params_converted": converted,
            "kept_fp32": list(self.options.keep_fp32),
        }
        summary = f"{n_low} ops run in {self.options.dtype}, {len(converted)} tensors converted, {len(casts)} casts inserted"
        return PassResult(summary, details)

    def ensures(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        for node in gm.graph.find_nodes(op="call_function", target=CAST):
            source = node.args[0]
            if isinstance(source, fx.Node) and _packet(source) in CONVERT_OPS:
                raise PassError(f"cast pass produced back-to-back casts at {node.name}")
        record_shapes(gm, ctx.example_inputs)
        now = [n.meta.get("planc_dtype") for n in self._outputs(gm)]
        if now != self._original_outputs:
            raise PassError(f"output dtypes changed from {self._original_outputs} to {now}")

    # ------------------------------------------------------------------ helpers

    def _domain(self, node: fx.Node, whole: bool, targets: frozenset[str]) -> str:
        if node.op in ("placeholder", "get_attr", "output"):
            return node.op
        if node.meta.get("planc_dtype") not in (torch.float32,):
            return "none"
        packet = _packet(node)
        if packet in CONVERT_OPS:
            return "fixed"
        if packet in FOLLOW_OPS:
            return "follow"
        if not (whole or within_any(owner_path(node), targets)) or self._kept(node, packet):
            return "fp32"
        if not any(_is_float(arg) for arg in node.all_input_nodes):
            return "fp32"  # creates floats from scratch (arange, full, ...)
        return "low"

    def _kept(self, node: fx.Node, packet: object) -> bool:
        keep = self.options.keep_fp32
        if any(packet in KEEP_OPS[kind] for kind in keep):
            return True
        return "pooling" in keep and any("Pool" in cls for _, cls in module_stack(node))

    @staticmethod
    def _outputs(gm: fx.GraphModule) -> list[fx.Node]:
        (output,) = gm.graph.find_nodes(op="output")
        return _flatten_nodes(output.args[0])

    @staticmethod
    def _cast_outputs(gm: fx.GraphModule, output: fx.Node, new_dtype: dict, cast) -> None:
        for value in _flatten_nodes(output.args[0]):
            original = value.meta.get("planc_dtype")
            if _is_float(value) and new_dtype.get(value) not in (None, original):
                output.replace_input_with(value, cast(value, original, output))


def _flatten_nodes(args: object) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.map_arg(args, lambda n: found.append(n) or n)
    return found
