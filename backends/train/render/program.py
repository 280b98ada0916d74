"""What a training program is made of (`Program`), and how plan values become Python literals."""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from planc.backends.train.checks import Mesh
from planc.backends.train.options import TrainTarget
from planc.passes.options import PassOptions
from planc.passes.prune import Prune

TEMPLATES = Path(__file__).parents[1] / "templates"


@dataclass(frozen=True)
class Program:
    """Everything the templates need, resolved: nothing here is looked up again at run time."""

    target: TrainTarget
    mesh: Mesh
    model: dict[str, Any]  # planc_runtime.load_model spec (planc_runtime/model.py)
    task: str  # causal_lm | encoder
    data_path: str  # absolute path or "stdlib"
    compression: list[tuple[PassOptions, list[str]]]
    stage_cuts: list[int] | None
    plan_name: str
    #: data.exclude resolved to absolute paths (encoders).
    exclude_paths: tuple[str, ...] = ()

    @property
    def strategy(self) -> set[str]:
        return set(self.target.strategy)

    @property
    def pipeline(self) -> bool:
        return "pipeline" in self.strategy

    @property
    def fsdp(self) -> bool:
        return "fsdp" in self.strategy

    @property
    def tensor(self) -> bool:
        return "tensor" in self.strategy

    @property
    def ddp(self) -> bool:
        return "ddp" in self.strategy

    @property
    def fp16(self) -> bool:
        return self.target.precision == "fp16" and self.target.loss_scaling == "dynamic"

    @property
    def sharded_checkpoints(self) -> bool:
        return self.fsdp or self.tensor or self.pipeline

    @property
    def prunes(self) -> list[tuple[int, Prune, list[str]]]:
        """The prune steps applied before (and kept through) training."""
        return [(i, o, p) for i, (o, p) in enumerate(self.compression, 1) if isinstance(o, Prune) and not self.defers(o)]

    def defers(self, options: PassOptions) -> bool:
        """Whether a step runs after training, on weights the plan's regularizer drove to zero."""
        regularize = self.target.regularize
        return isinstance(options, Prune) and regularize is not None and regularize.defers(options.method)

    @property
    def deferred(self) -> list[tuple[int, Prune, list[str]]]:
        """The prune steps run after training, on the regularized groups."""
        return [(i, o, p) for i, (o, p) in enumerate(self.compression, 1) if self.defers(o)]

    @property
    def regularizes_units(self) -> bool:
        """Group lasso on heads or channels: build_model traces the model to find them."""
        return self.target.regularize is not None and self.target.regularize.group != "weights"

    @property
    def encoder(self) -> bool:
        """Encoders distill on sentences against cached teacher outputs (no next-token loss)."""
        return self.task == "encoder"

    @property
    def shrinks_units(self) -> bool:
        """Heads or channels pruning: build_model traces the model on a few training samples."""
        return any(o.method in ("heads", "channels") for _, o, _ in self.prunes)

    @property
    def traces_units(self) -> bool:
        """build_model needs an example batch: it finds heads or channels in the traced model."""
        return self.shrinks_units or self.regularizes_units

    @property
    def measures_activations(self) -> bool:
        return any(options.measures_activations for _, options, _ in self.prunes)

    @property
    def masked(self) -> list[tuple[int, Prune, list[str]]]:
        return [(i, o, p) for i, o, p in self.prunes if o.method in ("magnitude", "nm")]

    @property
    def gradual(self) -> bool:
        return any(o.schedule == "gradual" for _, o, _ in self.masked)


# ------------------------------------------------------------------------------ Python literals


def literal(value: Any, indent: int = 0, width: int = 100) -> str:
    """`value` as Python source in the project's style (double quotes, wrapped when long)."""
    flat = _flat(value)
    if len(flat) + indent <= width or not isinstance(value, (list, tuple, dict)) or not value:
        return flat
    pad = " " * (indent + 4)
    if isinstance(value, dict):
        items = [f"{pad}{_flat(k)}: {literal(v, indent + 4, width)}," for k, v in value.items()]
        return "{\n" + "\n".join(items) + "\n" + " " * indent + "}"
    items = [f"{pad}{literal(v, indent + 4, width)}," for v in value]
    return "[\n" + "\n".join(items) + "\n" + " " * indent + "]"


def _flat(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_flat(k)}: {_flat(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_flat(v) for v in value) + "]"
    return repr(value)


def _const(name: str, value: Any, comment: str | None = None) -> str:
    line = f"{name} = {literal(value, 0)}"
    return f"{line}  # {comment}" if comment and "\n" not in line and len(line) + len(comment) < 96 else (
        f"# {comment}\n{line}" if comment else line
    )


def _signature(name: str, params: list[str], returns: str | None = None) -> str:
    """`def name(params) -> returns:`, one parameter per line when it would pass 100 columns."""
    tail = f" -> {returns}:" if returns else ":"
    line = f"def {name}({', '.join(params)}){tail}"
    if len(line) <= 100:
        return line
    return f"def {name}(\n" + "".join(f"    {p},\n" for p in params) + f"){tail}"


def _indent(code: str, levels: int) -> str:
    return textwrap.indent(textwrap.dedent(code).strip("\n"), "    " * levels)


