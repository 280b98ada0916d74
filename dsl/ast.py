"""The syntax tree of a `.plan` file: what was written, with where it was written.

These nodes know nothing of passes or models; `compiler/validate.py` gives them meaning.
Spans are excluded from equality, so two files that differ only in layout compare equal
(the formatter's round-trip test relies on that).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from planc.dsl.source import Source, Span


NOWHERE = Span("<generated>", 0, 0, 0, 0)


def _span() -> Span:
    """A span field: defaults to NOWHERE for generated nodes, ignored by equality."""
    return field(default=NOWHERE, compare=False, repr=False)  # type: ignore[return-value]


# ----------------------------------------------------------------------------- values


@dataclass(frozen=True)
class Number:
    """A number as written; `unit` is '%' or a byte size suffix such as 'MB'."""

    text: str
    span: Span = _span()

    @property
    def unit(self) -> str | None:
        for unit in ("%", "KiB", "MiB", "GiB", "TiB", "KB", "MB", "GB", "TB"):
            if self.text.endswith(unit):
                return unit
        return None

    @property
    def value(self) -> int | float:
        """The number in plain units: 50% -> 0.5, 2KiB -> 2048, 3 -> 3, 1e-4 -> 0.0001."""
        unit = self.unit
        digits = self.text[: len(self.text) - len(unit)] if unit else self.text
        number: int | float = float(digits) if any(c in digits for c in ".eE") else int(digits)
        if unit == "%":
            return number / 100
        if unit:
            power = "KMGT".index(unit[0]) + 1
            base = 1024 if "i" in unit else 1000
            return int(number * base**power)
        return number


@dataclass(frozen=True)
class String:
    value: str
    span: Span = _span()


@dataclass(frozen=True)
class Ident:
    """A bare word: an enum value (`magnitude`), a boolean (`true`), a provider (`cuda`)."""

    name: str
    span: Span = _span()


@dataclass(frozen=True)
class Range:
    first: Number
    last: Number
    span: Span = _span()


@dataclass(frozen=True)
class ListValue:
    items: tuple[Value, ...]
    span: Span = _span()


Value = Union[Number, String, Ident, Range, ListValue]


# ----------------------------------------------------------------------------- blocks


@dataclass(frozen=True)
class Option:
    """`key = value`."""

    key: str
    value: Value
    key_span: Span = _span()
    span: Span = _span()


@dataclass(frozen=True)
class InputDecl:
    """`input_ids: int64[batch, seq]`."""

    name: str
    dtype: str
    dims: tuple[str | int, ...]
    span: Span = _span()
    dtype_span: Span = _span()


@dataclass(frozen=True)
class SubBlock:
    """`key { ... }`: a nested group of options (verify, inputs, optimizer, ...)."""

    key: str
    block: Block
    key_span: Span = _span()
    span: Span = _span()


Entry = Union[Option, InputDecl, SubBlock]


@dataclass(frozen=True)
class Block:
    entries: tuple[Entry, ...]
    span: Span = _span()


# ----------------------------------------------------------------------------- selectors


@dataclass(frozen=True)
class SelName:
    """A bare name: a module type when capitalized (`Linear`), else a named selector or `all`."""

    name: str
    span: Span = _span()


@dataclass(frozen=True)
class SelCall:
    """`name("glob")`, `regex("...")`, `layers(0..2)`, `type("Linear")`."""

    func: str
    args: tuple[Value, ...]
    span: Span = _span()
    func_span: Span = _span()


@dataclass(frozen=True)
class SelBinary:
    op: str  # '|', '&' or '-'
    left: SelExpr
    right: SelExpr
    span: Span = _span()


SelExpr = Union[SelName, SelCall, SelBinary]


# ----------------------------------------------------------------------------- statements


@dataclass(frozen=True)
class Arg:
    key: str | None
    value: Value
    span: Span = _span()


@dataclass(frozen=True)
class Call:
    func: str
    args: tuple[Arg, ...]
    span: Span = _span()
    func_span: Span = _span()


@dataclass(frozen=True)
class Include:
    path: String
    span: Span = _span()


@dataclass(frozen=True)
class ModelStmt:
    name: str
    source: Call
    body: Block | None
    span: Span = _span()
    name_span: Span = _span()


@dataclass(frozen=True)
class SelectStmt:
    name: str
    optional: bool
    selector: SelExpr
    span: Span = _span()
    name_span: Span = _span()


@dataclass(frozen=True)
class Step:
    """One pass in a pipeline: `prune ffn { sparsity = 50% }` or `cast;`."""

    name: str
    selector: SelExpr | None
    body: Block | None
    span: Span = _span()
    name_span: Span = _span()


@dataclass(frozen=True)
class PipelineStmt:
    steps: tuple[Step, ...]
    span: Span = _span()


@dataclass(frozen=True)
class TargetStmt:
    kind: str
    body: Block
    span: Span = _span()
    kind_span: Span = _span()


Statement = Union[Include, ModelStmt, SelectStmt, PipelineStmt, TargetStmt]


@dataclass(frozen=True)
class Comment:
    text: str
    span: Span


@dataclass(frozen=True)
class Document:
    statements: tuple[Statement, ...]
    source: Source = field(compare=False, repr=False)
    comments: tuple[Comment, ...] = field(default=(), compare=False, repr=False)
