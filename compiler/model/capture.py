"""Capture a loaded model as an fx graph, checked against the eager model, and its module table.

`torch.export` with the declared dynamic dims first; if it refuses, `torch.fx.symbolic_trace`
with the submodules it cannot trace kept as opaque leaves.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import logging
import sys
from collections.abc import Iterator
from typing import Any, Callable

import torch
import torch.fx
from torch import nn
from torch.utils import _pytree as pytree

from planc.compiler.model.common import FrontendError, logger
from planc.compiler.model.deferred import DEFERRED_WEIGHTS, deferred_loaders, sharing_deferred
from planc.compiler.model.load import LoadedModel

#: Tolerances of the capture check: the graph computes the same ops as eager, so only
#: reassociation noise is allowed.
_CAPTURE_RTOL = 1e-4
_CAPTURE_ATOL = 1e-4

def capture(loaded: LoadedModel) -> torch.fx.GraphModule:
    """The model as an fx graph with dynamic batch/seq, checked against eager.

    The graph owns a copy of the weights: rewriting it never changes `loaded.model`. A streamed
    model's deferred weights are not copied (their storage is never written): the graph reads
    them through its own loaders (`DEFERRED_WEIGHTS`), and a pass that rewrites one replaces its loader.

    `torch.export` first; if it fails, `torch.fx.symbolic_trace` with untraceable submodules
    kept as opaque leaves (listed in `gm.meta["planc_capture"]`, passes cannot see inside them).
    """
    try:
        # The graph gets its own weights: passes rewrite them in place, and `loaded.model` must
        # stay the untouched reference that verification compares against.
        model = copy.deepcopy(loaded.model, sharing_deferred(loaded.model))
    except Exception as error:
        raise FrontendError(
            f"cannot copy model '{loaded.source.name}' for capture: {type(error).__name__}: {error}"
        ) from error
    chatter = io.StringIO()
    try:
        with _quiet_export(chatter):
            exported = torch.export.export(
                model, (), kwargs=dict(loaded.example_inputs), dynamic_shapes=loaded.dynamic_shapes, strict=False
            )
        sys.stderr.write(chatter.getvalue())
        gm = exported.module()
        gm.meta["planc_capture"] = {"method": "export", "leaves": []}
    except Exception as export_error:
        export_summary = _first_line(export_error)
        logger.debug("torch.export error in full:\n%s\n%s", export_error, chatter.getvalue())
        logger.warning(
            "torch.export could not capture '%s' (%s); falling back to torch.fx.symbolic_trace",
            loaded.source.name,
            export_summary,
        )
        gm = _symbolic_capture(loaded, model, export_summary)
    gm.meta[DEFERRED_WEIGHTS] = deferred_loaders(model)
    if not gm.meta[DEFERRED_WEIGHTS]:  # a streamed graph holds no weights to run; its artifact is verified end to end
        _check_capture(loaded, gm)
    return gm


#: torch loggers that narrate a failed export (graph dumps, guard hints) at warning/error level.
_EXPORT_LOGGERS = ("torch.fx.experimental.symbolic_shapes", "torch.export", "torch._export")


@contextlib.contextmanager
def _quiet_export(chatter: io.StringIO) -> Iterator[None]:
    """Hold back what torch prints while trying an export (a failed one dumps the partial graph
    to stderr): a failure is reported once, by us, and the fallback may well succeed. The
    caller replays the text after a success."""
    loggers = [logging.getLogger(name) for name in _EXPORT_LOGGERS]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stderr(chatter):
            yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)


class _LeafTracer(torch.fx.Tracer):
    """A tracer that keeps the named submodules as opaque calls and remembers where it failed."""

    def __init__(self, leaves: set[str]) -> None:
        super().__init__()
        self.leaves = leaves
        #: Dotted path of the innermost module whose forward raised, "" for the root.
        self.failed_at: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.leaves or super().is_leaf_module(m, module_qualified_name)

    def call_module(
        self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_at is None:
                self.failed_at = self.path_of_module(m)
            raise


def _symbolic_capture(loaded: LoadedModel, model: nn.Module, export_summary: str) -> torch.fx.GraphModule:
    """symbolic_trace, making each submodule that fails an opaque leaf, until it traces or the
    failure reaches the model's own forward."""
    params = inspect.signature(model.forward).parameters
    concrete = {
        name: p.default
        for name, p in params.items()
        if name not in loaded.example_inputs and p.default is not inspect.Parameter.empty
    }
    classes = dict(module_table(model))
    leaves: set[str] = set()
    first_failure: tuple[str, BaseException] | None = None
    for _ in range(len(classes) + 1):
        tracer = _LeafTracer(set(leaves))
        try:
            graph = tracer.trace(model, concrete_args=concrete or None)
        except Exception as error:
            culprit = tracer.failed_at or ""
            if first_failure is None:
                first_failure = (culprit, error)
            if culprit and culprit not in leaves:
                logger.info("symbolic_trace failed inside '%s'; keeping it as an opaque leaf", culprit)
                leaves.add(culprit)
                continue
            where, cause = first_failure
            place = f"submodule '{where}' ({classes.get(where, '?')})" if where else f"{type(model).__name__}.forward"
            moved = "" if culprit == where else (
                f" (treating it as an opaque leaf moved the failure to {repr(culprit) if culprit else 'the model'})"
            )
            raise FrontendError(
                f"cannot capture model '{loaded.source.name}': torch.export failed ({export_summary}), and "
                f"torch.fx.symbolic_trace failed in {place}: {type(cause).__name__}: {_first_line(cause)}{moved}"
            ) from cause
        gm = torch.fx.GraphModule(tracer.root, graph, class_name=type(model).__name__)
        if leaves:
            logger.warning(
                "captured '%s' with torch.fx.symbolic_trace; opaque submodules (passes cannot see inside): %s",
                loaded.source.name,
                ", ".join(sorted(leaves)),
            )
        gm.meta["planc_capture"] = {
            "method": "symbolic_trace",
            "leaves": sorted(leaves),
            "export_error": export_summary,
        }
        return gm
    raise FrontendError(f"cannot capture model '{loaded.source.name}': symbolic_trace did not converge")


def _check_capture(loaded: LoadedModel, gm: torch.fx.GraphModule) -> None:
    """The graph computes what the eager model computes, on the example batch."""
    with torch.no_grad():
        try:
            got = gm(**loaded.example_inputs)
        except Exception as error:
            raise FrontendError(
                f"the captured graph of '{loaded.source.name}' fails on the example inputs: "
                f"{type(error).__name__}: {_first_line(error)}"
            ) from error
        want = loaded.model(**loaded.example_inputs)
    got_leaves = [t for t in pytree.tree_leaves(got) if isinstance(t, torch.Tensor)]
    want_leaves = [t for t in pytree.tree_leaves(want) if isinstance(t, torch.Tensor)]
    if len(got_leaves) != len(want_leaves):
        raise FrontendError(
            f"the captured graph of '{loaded.source.name}' returns {len(got_leaves)} tensors, "
            f"the model {len(want_leaves)}"
        )
    for a, b in zip(got_leaves, want_leaves):
        if a.shape != b.shape or not torch.allclose(a.float(), b.float(), rtol=_CAPTURE_RTOL, atol=_CAPTURE_ATOL):
            diff = (a.float() - b.float()).abs().max().item() if a.shape == b.shape else float("nan")
            raise FrontendError(
                f"the captured graph of '{loaded.source.name}' differs from the eager model "
                f"(shapes {tuple(a.shape)} vs {tuple(b.shape)}, max abs diff {diff:.3g})"
            )


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    first = text.splitlines()[0] if text else type(error).__name__
    return first[:300]


# ----------------------------------------------------------------------------- module table


def module_table(model: nn.Module) -> list[tuple[str, str]]:
    """(dotted path, class name) of every submodule, root excluded: what selectors match.

    For a graph from `torch.export` (whose submodules are plain containers) the original
    classes come from the nodes' `nn_module_stack` metadata.
    """
    if isinstance(model, torch.fx.GraphModule):
        from_meta = _module_table_from_meta(model)
        if from_meta:
            return from_meta
    return [(name, type(module).__name__) for name, module in model.named_modules() if name]


def _module_table_from_meta(gm: torch.fx.GraphModule) -> list[tuple[str, str]]:
    seen: dict[str, str] = {}
    for node in gm.graph.nodes:
        for path, kind in (node.meta.get("nn_module_stack") or {}).values():
            # torch.export tags nodes it cannot place with a sentinel entry: not a module.
            if path and path not in seen and not path.startswith("_empty_nn_module_stack"):
                name = kind.__name__ if isinstance(kind, type) else str(kind).rsplit(".", 1)[-1]
                seen[path] = name
    return list(seen.items())


