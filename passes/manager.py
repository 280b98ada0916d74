"""Runs passes in order on a GraphModule and records what each one changed.

After every pass the graph is linted and recompiled; a failure anywhere becomes
`PassError("while running 'quantize' after ['prune']: <message>")` with the original
exception as `__cause__`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import fx

from planc.passes.base import GraphPass, PassContext, PassError
from planc.passes.graph_utils import quiet_deepcopy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GraphStats:
    """Size of a GraphModule: graph nodes (nested graphs included), parameter elements, bytes."""

    nodes: int
    params: int
    bytes: int

    @classmethod
    def of(cls, gm: torch.nn.Module) -> GraphStats:
        nodes = sum(len(m.graph.nodes) for m in gm.modules() if isinstance(m, fx.GraphModule))
        params = sum(p.numel() for p in gm.parameters())
        nbytes = sum(p.numel() * p.element_size() for p in gm.parameters())
        nbytes += sum(b.numel() * b.element_size() for b in gm.buffers())
        return cls(nodes=nodes, params=params, bytes=nbytes)


@dataclass
class PassRecord:
    name: str
    summary: str
    details: dict
    before: GraphStats
    after: GraphStats
    source: str = ""
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


def graph_code(gm: fx.GraphModule) -> str:
    """Readable Python of the graph and of every nested GraphModule (for `--emit fx`), each
    after a comment listing the tensors it holds (what a pass shrinks or turns into integers)."""
    parts = []
    for name, module in gm.named_modules():
        if isinstance(module, fx.GraphModule):
            nested = [n for n, m in module.named_modules() if n and isinstance(m, fx.GraphModule)]
            tensors = [
                f"#   {key}: {str(value.dtype).removeprefix('torch.')}{list(value.shape)}"
                for key, value in module.state_dict(keep_vars=True).items()
                if not any(key.startswith(n + ".") for n in nested)  # listed under their own graph
            ]
            parts.append("\n".join([f"# ---- {name or '<root>'}", *tensors, module.code.strip()]) + "\n")
    return "\n".join(parts)


def _lint_and_recompile(gm: fx.GraphModule) -> None:
    for module in gm.modules():
        if isinstance(module, fx.GraphModule):
            module.graph.lint()
            module.recompile()


class PassManager:
    """Run `(pass, context)` steps in order; `copy=True` leaves the caller's module untouched."""

    def __init__(self, *, copy: bool = True) -> None:
        self.copy = copy

    def run(
        self, gm: fx.GraphModule, steps: list[tuple[GraphPass, PassContext]]
    ) -> tuple[fx.GraphModule, list[PassRecord]]:
        if self.copy:
            gm = quiet_deepcopy(gm)
        records: list[PassRecord] = []
        for graph_pass, ctx in steps:
            before = GraphStats.of(gm)
            start = time.perf_counter()
            try:
                graph_pass.requires(gm, ctx)
                result = graph_pass.call(gm, ctx)
                if result.graph is not None:  # the pass built a new module (partition)
                    gm = result.graph
                _lint_and_recompile(gm)
                graph_pass.ensures(gm, ctx)
            except Exception as exc:  # noqa: BLE001 - every failure is reported the same way
                done = [record.name for record in records]
                where = f"while running '{graph_pass.name}'" + (f" after {done}" if done else "")
                message = exc.message if isinstance(exc, PassError) else f"{type(exc).__name__}: {exc}"
                raise PassError(f"{where}: {message}", source=ctx.source, pass_name=graph_pass.name) from exc
            after = GraphStats.of(gm)
            record = PassRecord(
                name=graph_pass.name,
                summary=result.summary,
                details=result.details,
                before=before,
                after=after,
                source=ctx.source,
                seconds=time.perf_counter() - start,
            )
            log.info("%s: %s (%d -> %d params)", record.name, record.summary, before.params, after.params)
            records.append(record)
        return gm, records
