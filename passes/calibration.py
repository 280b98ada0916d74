"""Layer inputs measured on calibration text, shared by gptq, awq, wanda and sparsegpt.

The selected Linears are grouped by the node they read (q/k/v of one attention block share one
input, so one capture serves the three). `InputStats` accumulates what the methods need from a
group's input X (rows = tokens, columns = input channels): the Gram matrix `X^T X` (GPTQ's and
SparseGPT's Hessian up to a factor; its diagonal gives Wanda's `||X_j||_2`), `sum |X_j|` (AWQ)
and, on request, a bounded sample of the rows themselves (to measure output errors). Rows of
padding tokens (attention mask 0, when a sample carries one) are left out of all of them: they
are not text, and a batch padded to one length would otherwise weigh its padding.

`sequential` processes the groups in graph order in one lockstep walk of the samples through
the graph (`walk`): each group's input is measured when the walk reaches it, after the earlier
groups were solved, so a method that replaces the weights of a group (with their quantized or
pruned values) makes the later groups calibrate on the outputs the compressed model really
produces, as GPTQ and SparseGPT do block by block. The walk costs one forward pass over the
samples, reads each weight where it is used and frees each activation after its last reader:
it holds one layer's weights and the samples' live activations at a time, which is how a
real-sized decoder's projections, read from the checkpoint (`compiler/model/deferred.py`),
are calibrated without loading the model.
"""

from __future__ import annotations

import inspect
import logging
import math
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn
from torch.fx import _pytree as fx_pytree
from tqdm import tqdm

from planc.passes.base import PassContext, PassError
from planc.passes.graph_utils import LinearSite, get_tensor

log = logging.getLogger(__name__)

Samples = list[dict[str, torch.Tensor]]


def load_calibration(ctx: PassContext, path: str | None, count: int, purpose: str) -> Samples:
    """The plan's calibration samples, or the example inputs when there is no file or loader."""
    if ctx.load_samples is not None and path is not None:
        samples = ctx.load_samples(path, count)
        if not samples:
            raise PassError(f"calibration file {path!r} gave no samples")
        return samples
    if path is not None:
        log.warning("no calibration loader: calibrating %s on the example inputs", purpose)
    return [ctx.example_inputs]


def group_by_input(gm: fx.GraphModule, linears: list[LinearSite]) -> list[tuple[fx.Node, list[LinearSite]]]:
    """(input node, the Linears reading it), in graph order of the input nodes."""
    groups: dict[fx.Node, list[LinearSite]] = {}
    for site in linears:
        groups.setdefault(site.input, []).append(site)
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    return sorted(groups.items(), key=lambda item: order[item[0]])


class InputStats:
    """What the calibrated methods need from the rows of a Linear input."""

    def __init__(self, keep_rows: int = 0, gram: bool = True) -> None:
        self.keep_rows = keep_rows
        self.with_gram = gram
        self.gram: torch.Tensor | None = None  # sum over rows of x x^T
        self.abs_sum: torch.Tensor | None = None
        self.count = 0
        self.rows: list[torch.Tensor] = []
        self.kept = 0

    def add(self, values: list[torch.Tensor], masks: list[torch.Tensor | None]) -> None:
        """Count the rows of `values` (one per sample), leaving out padding tokens: a value laid
        out [batch, seq, channels] keeps the rows its sample's attention mask marks as text."""
        rows = torch.cat([
            value.detach()[mask] if mask is not None and tuple(value.shape[:-1]) == tuple(mask.shape)
            else value.detach().reshape(-1, value.shape[-1])
            for value, mask in zip(values, masks, strict=True)
        ]).float()
        if self.with_gram:  # fp32 products over all the samples' rows at once (BLAS speed)
            self.gram = rows.t() @ rows if self.gram is None else self.gram.addmm_(rows.t(), rows)
        abs_sum = rows.abs().sum(0, dtype=torch.float64)
        self.abs_sum = abs_sum if self.abs_sum is None else self.abs_sum + abs_sum
        self.count += rows.shape[0]
        if self.kept < self.keep_rows:
            take = rows[: self.keep_rows - self.kept].clone()
            self.rows.append(take)
            self.kept += take.shape[0]

    @property
    def hessian(self) -> torch.Tensor:
        """Mean `x x^T` over the rows seen (GPTQ's H = 2 X^T X / n up to the factor 2), float32."""
        if self.gram is None:
            raise PassError("calibration never reached this layer's input")
        return self.gram / self.count

    @property
    def norms(self) -> torch.Tensor:
        """||X_j||_2 per input channel over every row seen (Wanda's activation statistic)."""
        if self.gram is None:
            raise PassError("calibration never reached this layer's input")
        return torch.diag(self.gram).sqrt().float()

    @property
    def mean_abs(self) -> torch.Tensor:
        """mean |X_j| per input channel (AWQ's activation statistic)."""
        if self.abs_sum is None:
            raise PassError("calibration never reached this layer's input")
        return (self.abs_sum / self.count).float()

    @property
    def sample(self) -> torch.Tensor:
        """The kept rows of X, [rows, in] float32."""
        return torch.cat(self.rows)


Visit = Callable[[list[torch.Tensor], list[torch.Tensor | None]], "dict[str, torch.Tensor] | None"]


def walk(gm: fx.GraphModule, samples: Samples, visits: dict[fx.Node, Visit], what: str | None = None) -> None:
    """Run every sample through `gm` node by node, all samples in lockstep, calling
    `visits[node](values, masks)` once a visited node's value is known for every sample (its
    value per sample, and each sample's attention mask or None). The walk ends after the last
    visited node: nothing later runs (not the LM head's logits, not the outputs).

    Why lockstep rather than one forward pass per sample: a visit sees the node over all the
    calibration data before anything after it runs, so it can change what follows. A visit may
    return {weight name: tensor}, used in place of that weight by the rest of the walk (until
    its last reader has run: gptq's rounded weights), or rewrite weights itself (`set_tensor`).
    Weights are read where used (`graph_utils.get_tensor`; a deferred weight is read from its
    checkpoint, one at a time) and every value is freed after its last reader, so the walk holds
    one layer's weights and the live activations of the samples, never the model.
    """
    if not visits:
        return
    nodes = list(gm.graph.nodes)
    position = {node: i for i, node in enumerate(nodes)}
    end = max(position[node] for node in visits)
    last_read = {node: max((position[u] for u in node.users if u.op != "output"), default=position[node]) for node in nodes}
    freed_after: dict[int, list[fx.Node]] = {}  # position -> values no node after it reads
    readers: dict[str, int] = {}  # weight -> readers still to run (an override lives that long)
    for node in nodes:
        if node.op == "get_attr":  # weights are read where used, never kept in the environments
            readers[str(node.target)] = readers.get(str(node.target), 0) + sum(u.op != "output" for u in node.users)
        else:
            freed_after.setdefault(last_read[node], []).append(node)
    overrides: dict[str, torch.Tensor] = {}
    placeholders = [node for node in nodes if node.op == "placeholder"]
    envs = [dict(zip(placeholders, _flat_inputs(gm, sample), strict=True)) for sample in samples]
    masks = [sample.get("attention_mask") for sample in samples]
    masks = [None if mask is None else mask.bool() for mask in masks]
    bar = tqdm(total=len(visits), desc=what, unit="input", disable=what is None or not sys.stderr.isatty(), leave=False)
    with torch.no_grad():
        for node in nodes[: end + 1]:
            if node.op in ("call_function", "call_method", "call_module"):
                weights = {arg: overrides.get(str(arg.target)) for arg in node.all_input_nodes if arg.op == "get_attr"}
                for arg in weights:
                    if weights[arg] is None:
                        weights[arg] = get_tensor(gm, str(arg.target))
                for env in envs:
                    env[node] = _run_node(gm, node, lambda arg: weights[arg] if arg in weights else env[arg])  # noqa: B023
                for arg in weights:
                    target = str(arg.target)
                    readers[target] -= 1
                    if readers[target] <= 0:
                        overrides.pop(target, None)
                del weights
            if node in visits:
                bar.update()
                replaced = visits[node]([env[node] for env in envs], masks)
                overrides.update(replaced or {})
            for done in freed_after.get(position[node], ()):
                for env in envs:
                    env.pop(done, None)
    bar.close()


def _flat_inputs(gm: fx.GraphModule, sample: dict[str, torch.Tensor]) -> list:
    """The placeholder values `gm(**sample)` would bind (a torch.export module flattens its
    keyword inputs by its input spec; a traced one binds them by name)."""
    bound = inspect.signature(gm.forward).bind(**sample)
    bound.apply_defaults()
    spec = getattr(gm, "_in_spec", None)
    if spec is None and isinstance(gm.graph._codegen, fx.graph._PyTreeCodeGen):
        spec = gm.graph._codegen.pytree_info.in_spec
    if spec is not None:  # (args, kwargs): the first parameters positional, as the module's code passes them
        names, positional = list(bound.arguments), spec.child(0).num_children
        args = [bound.arguments[name] for name in names[:positional]]
        return fx_pytree.tree_flatten_spec((args, {name: bound.arguments[name] for name in names[positional:]}), spec)
    return list(bound.arguments.values())


def _run_node(gm: fx.GraphModule, node: fx.Node, value: Callable[[fx.Node], object]) -> object:
    args = fx.node.map_arg(node.args, value)
    kwargs = fx.node.map_arg(node.kwargs, value)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        this, *rest = args
        return getattr(this, node.target)(*rest, **kwargs)
    return gm.get_submodule(str(node.target))(*args, **kwargs)


def _feed(observer: nn.Module | InputStats, values: list[torch.Tensor], masks: list[torch.Tensor | None]) -> None:
    if isinstance(observer, InputStats):
        observer.add(values, masks)
        return
    for value in values:
        observer(value)


def observe(gm: fx.GraphModule, samples: Samples, nodes: list[fx.Node], factory: Callable[[], nn.Module | InputStats]) -> dict[fx.Node, Any]:
    """`samples` walked through `gm` (the graph as it is now) with an observer made by `factory`
    fed each of `nodes`' values; the graph is not changed."""
    observers = {node: factory() for node in dict.fromkeys(nodes)}
    walk(gm, samples, {node: lambda values, masks, o=observers[node]: _feed(o, values, masks) for node in observers})
    return observers


def capture(
    gm: fx.GraphModule, samples: Samples, nodes: list[fx.Node], keep_rows: int = 0, gram: bool = True
) -> dict[fx.Node, InputStats]:
    """Statistics of `nodes`' values over `samples` (the graph as it is now; nothing after the
    last of them runs). `gram = False` skips the [in, in] Gram matrix."""
    return observe(gm, samples, nodes, lambda: InputStats(keep_rows, gram=gram))  # type: ignore[return-value]


def sequential(
    gm: fx.GraphModule,
    samples: Samples,
    linears: list[LinearSite],
    solve: Callable[[list[LinearSite], InputStats], "dict[str, torch.Tensor] | None"],
    what: str,
    keep_rows: int = 0,
    gram: bool = True,
) -> float:
    """Call `solve(sites, stats)` on each input group in graph order, in one walk of the
    samples: a group's input is measured with the earlier groups already solved. `solve` may
    return {weight: tensor} to use for the rest of the walk (rounded weights) or rewrite weights
    in place. Shows a progress bar on a terminal; returns the seconds spent."""
    start = time.perf_counter()

    def visit(sites: list[LinearSite]) -> Visit:
        def run(values: list[torch.Tensor], masks: list[torch.Tensor | None]) -> dict[str, torch.Tensor] | None:
            stats = InputStats(keep_rows, gram=gram)
            stats.add(values, masks)
            return solve(sites, stats)

        return run

    walk(gm, samples, {x: visit(sites) for x, sites in group_by_input(gm, linears)}, what)
    return time.perf_counter() - start


def output_error(w: torch.Tensor, w_new: torch.Tensor, hessian: torch.Tensor) -> float:
    """Relative output error ||X (W - W_new)^T|| / ||X W^T|| from H = X^T X / n (no rows needed)."""
    (error,), norm = output_error_terms(w, [w_new], hessian)
    return math.sqrt(error / norm) if norm > 0 else 0.0


def output_error_terms(w: torch.Tensor, candidates: list[torch.Tensor], hessian: torch.Tensor) -> tuple[list[float], float]:
    """([||X (W - W_c)^T||^2 / n per candidate], ||X W^T||^2 / n): summed over row blocks, they
    give `output_error`. A report figure: fp32 products, summed in fp64."""
    w, h = w.float(), hessian.float()
    squares = [max(float(((diff @ h) * diff).sum(dtype=torch.float64)), 0.0) for diff in (w - c.float() for c in candidates)]
    return squares, float(((w @ h) * w).sum(dtype=torch.float64))


def damped_inverse_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1; dead inputs get diag 1 first.

    GPTQ's error feedback and SparseGPT's OBS updates both read the rows of this factor.
    Computed without forming the inverse: with J the order reversal and J H J = C C^T (C lower),
    H^-1 = U^T U for U = J C^-1 J (one factorization and one triangular solve, in fp64, each in
    place: two [in, in] fp64 buffers, 1 GB for a real-sized 8192-wide input).
    """
    h = hessian.detach().flip(0, 1).to(torch.float64, copy=True)  # J H J, in place from here (8192^2: 0.5 GB each)
    diagonal = h.diagonal()
    diagonal[diagonal == 0] = 1.0
    diagonal += damp * diagonal.mean()
    lower = torch.linalg.cholesky(h, out=h)  # both in place: LAPACK overwrites its input
    del h, diagonal
    inverse = torch.eye(lower.shape[0], dtype=lower.dtype)
    torch.linalg.solve_triangular(lower, inverse, upper=False, out=inverse)
    del lower
    return inverse.float().flip(0, 1)
