"""Layer inputs measured on calibration text, shared by gptq, awq, wanda and sparsegpt.

The selected Linears are grouped by the node they read (q/k/v of one attention block share one
input, so one capture serves the three). `InputStats` accumulates what the methods need from a
group's input X (rows = tokens, columns = input channels): the Gram matrix `X^T X` (GPTQ's and
SparseGPT's Hessian up to a factor; its diagonal gives Wanda's `||X_j||_2`), `sum |X_j|` (AWQ)
and, on request, a bounded sample of the rows themselves (to measure output errors). Rows of
padding tokens (attention mask 0, when a sample carries one) are left out of all of them: they
are not text, and a batch padded to one length would otherwise weigh its padding.

`sequential` processes the groups in graph order and captures each one's input only when its
turn comes, on the graph as the earlier groups left it: a method that replaces the weights of a
group (with their quantized or pruned values) makes the later groups calibrate on the outputs
the compressed model really produces, as GPTQ and SparseGPT do block by block. Each capture
stops the forward pass at the observed node, so a group costs a partial forward per sample.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable

import torch
from torch import fx, nn
from tqdm import tqdm

from planc.passes.base import PassContext, PassError
from planc.passes.graph_utils import LinearSite

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


class InputStats(nn.Module):
    """Pass-through observer of a Linear input; with `stop`, ends the forward pass once it has seen it."""

    def __init__(self, keep_rows: int = 0, stop: bool = False, gram: bool = True) -> None:
        super().__init__()
        self.keep_rows = keep_rows
        self.stop = stop
        self.with_gram = gram
        self.gram: torch.Tensor | None = None  # sum over rows of x x^T, float64
        self.abs_sum: torch.Tensor | None = None
        self.count = 0
        self.rows: list[torch.Tensor] = []
        self.kept = 0
        #: The current sample's attention mask [batch, seq] (set by `observe`): only the rows of
        #: real tokens count, when the observed value is laid out [batch, seq, channels].
        self.token_mask: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.token_mask
        if mask is not None and tuple(x.shape[:-1]) == tuple(mask.shape):
            rows = x.detach()[mask].double()  # padding tokens carry no text: left out
        else:
            rows = x.detach().reshape(-1, x.shape[-1]).double()
        if self.with_gram:
            gram = rows.t() @ rows
            self.gram = gram if self.gram is None else self.gram + gram
        abs_sum = rows.abs().sum(0)
        self.abs_sum = abs_sum if self.abs_sum is None else self.abs_sum + abs_sum
        self.count += rows.shape[0]
        if self.kept < self.keep_rows:
            take = rows[: self.keep_rows - self.kept].float()
            self.rows.append(take)
            self.kept += take.shape[0]
        if self.stop:
            raise Reached
        return x

    @property
    def hessian(self) -> torch.Tensor:
        """Mean `x x^T` over the rows seen (GPTQ's H = 2 X^T X / n up to the factor 2), float32."""
        if self.gram is None:
            raise PassError("calibration never reached this layer's input")
        return (self.gram / self.count).float()

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


class Reached(Exception):
    """Raised by a stopping observer: the rest of the forward pass is not needed."""


def observe(gm: fx.GraphModule, samples: Samples, nodes: list[fx.Node], factory: Callable[[], nn.Module]) -> dict[fx.Node, nn.Module]:
    """Run `samples` through `gm` (the graph as it is now) with an observer made by `factory`
    on each of `nodes`; the observers are removed again. An observer may raise `Reached` to end
    a forward pass early (nothing after what it watches is needed)."""
    observers: dict[fx.Node, nn.Module] = {}
    inserted: list[fx.Node] = []
    for index, source in enumerate(dict.fromkeys(nodes)):
        name = f"planc_observer_{index}"
        observers[source] = factory()
        gm.add_submodule(name, observers[source])
        with gm.graph.inserting_after(source):
            inserted.append(gm.graph.call_module(name, (source,)))
    gm.recompile()
    try:
        with torch.no_grad():
            for sample in samples:
                mask = sample.get("attention_mask")
                for observer in observers.values():
                    if hasattr(observer, "token_mask"):
                        observer.token_mask = None if mask is None else mask.bool()
                try:
                    gm(**sample)
                except Reached:
                    pass
    finally:
        for node in inserted:
            gm.graph.erase_node(node)
            delattr(gm, str(node.target))
        gm.recompile()
    return observers


def capture(
    gm: fx.GraphModule, samples: Samples, nodes: list[fx.Node], keep_rows: int = 0, gram: bool = True
) -> dict[fx.Node, InputStats]:
    """Statistics of `nodes`' values over `samples` (one forward pass per sample, the graph as it is now).

    A single node is captured with a stopping observer: nothing after it runs. `gram = False`
    skips the [in, in] Gram matrix (AWQ captures every input at once and needs only mean |X|).
    """
    stop = len(set(nodes)) == 1
    return observe(gm, samples, nodes, lambda: InputStats(keep_rows, stop=stop, gram=gram))  # type: ignore[return-value]


def sequential(
    gm: fx.GraphModule,
    samples: Samples,
    linears: list[LinearSite],
    solve: Callable[[list[LinearSite], InputStats], None],
    what: str,
    keep_rows: int = 0,
) -> float:
    """Call `solve(sites, stats)` on each input group in graph order, capturing it just before.

    `solve` may rewrite the weights of its sites in place (set_tensor); later groups see them.
    Shows a progress bar on a terminal; returns the seconds spent.
    """
    start = time.perf_counter()
    groups = group_by_input(gm, linears)
    bar = tqdm(groups, desc=what, unit="input", disable=not sys.stderr.isatty(), leave=False)
    for x, sites in bar:
        bar.set_postfix_str(sites[0].module_path, refresh=False)
        solve(sites, capture(gm, samples, [x], keep_rows)[x])
    return time.perf_counter() - start


def output_error(w: torch.Tensor, w_new: torch.Tensor, hessian: torch.Tensor) -> float:
    """Relative output error ||X (W - W_new)^T|| / ||X W^T|| from H = X^T X / n (no rows needed)."""
    diff, w, h = (w - w_new).double(), w.double(), hessian.double()
    num = ((diff @ h) * diff).sum()
    den = ((w @ h) * w).sum()
    return float(torch.sqrt(num.clamp(min=0) / den)) if den > 0 else 0.0


def damped_inverse_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1; dead inputs get diag 1 first.

    GPTQ's error feedback and SparseGPT's OBS updates both read the rows of this factor.
    """
    h = hessian.detach().double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    h += damp * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inverse, upper=True).float()
