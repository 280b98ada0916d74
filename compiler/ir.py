"""The typed plan IR: what a `.plan` file means, once parsed and validated.

Every node is a frozen pydantic model that carries the `Span` of the plan text it came from,
so any later stage (capture, a pass, a backend) can point its error at the right line.
Pass and target options are the option models owned by `passes/` and by each target kind
(`compiler/targets.py`); the IR holds them without knowing which kinds exist.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny

from planc.dsl.source import Span
from planc.passes.options import PassOptions


class Node(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)
    span: Span = Field(repr=False)


# ----------------------------------------------------------------------------- model source


class InputSpec(Node):
    """One model input: `input_ids: int64[batch, seq]`. Symbolic dims are names, fixed dims ints."""

    name: str
    dtype: Literal["int64", "int32", "float32", "float16", "bool"]
    dims: tuple[str | int, ...]


class ModelSource(Node):
    """Where the model comes from.

    - `factory`: `ref` is `path/to/file.py:function` (relative to the plan file) or an
      importable `package.module:function`; `args` are passed as keyword arguments.
    - `hf`: `ref` is a local Hugging Face directory (relative to the plan file), or with
      `package` set, the directory shipped inside that installed Python package.
    """

    name: str
    kind: Literal["factory", "hf"]
    ref: str
    package: str | None = None
    args: dict[str, Any] = Field(default_factory=dict)
    #: What the model computes, which decides pooling and verification: `encoder` (sentence
    #: embeddings, mean-pooled) or `causal_lm` (next-token logits). `auto` asks the model.
    task: Literal["auto", "encoder", "causal_lm"] = "auto"
    inputs: tuple[InputSpec, ...]
    #: Directory of the plan file: relative paths in the plan resolve against it.
    base_dir: Path


# ----------------------------------------------------------------------------- selectors


class TypeSel(Node):
    """Modules of a class: `Linear`, `Embedding`, `LayerNorm`, ... (by class name)."""

    op: Literal["type"] = "type"
    type_name: str


class NameSel(Node):
    """Modules whose dotted path matches a glob: `name("encoder.layer.*.output.dense")`."""

    op: Literal["name"] = "name"
    pattern: str


class RegexSel(Node):
    """Modules whose dotted path fully matches a regular expression: `regex("...")`."""

    op: Literal["regex"] = "regex"
    pattern: str


class LayerSel(Node):
    """Modules inside repeated blocks `first..last` (inclusive): `layers(0..2)`."""

    op: Literal["layers"] = "layers"
    first: int
    last: int


class RefSel(Node):
    """A named selector defined with `select NAME = ...`."""

    op: Literal["ref"] = "ref"
    ref: str


class AllSel(Node):
    op: Literal["all"] = "all"


class BinSel(Node):
    """`a | b` union, `a & b` intersection, `a - b` difference."""

    op: Literal["|", "&", "-"]
    left: Selector
    right: Selector


Selector = Annotated[
    Union[TypeSel, NameSel, RegexSel, LayerSel, RefSel, AllSel, BinSel], Field(discriminator="op")
]
BinSel.model_rebuild()


class SelectDef(Node):
    name: str
    selector: Selector
    #: `select? name = ...` : matching nothing is a warning instead of an error.
    optional: bool = False


# ----------------------------------------------------------------------------- pipeline and plan


class PassStep(Node):
    """One line of `pipeline { ... }`: a pass, what it acts on, and its validated options."""

    selector: Selector | None
    options: PassOptions
    #: Span of each option as written, for errors found later (e.g. by the pass itself).
    option_spans: dict[str, Span] = Field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return self.options.name


class Target(Node):
    #: The validated options of the target's kind; `options.kind` names the kind.
    options: SerializeAsAny[BaseModel]
    option_spans: dict[str, Span] = Field(default_factory=dict, repr=False)

    @property
    def kind(self) -> str:
        return self.options.kind  # type: ignore[attr-defined]


class Plan(Node):
    model: ModelSource
    selectors: dict[str, SelectDef] = Field(default_factory=dict)
    pipeline: tuple[PassStep, ...] = ()
    targets: tuple[Target, ...] = ()

    def target(self, kind: str) -> Target | None:
        return next((t for t in self.targets if t.kind == kind), None)
