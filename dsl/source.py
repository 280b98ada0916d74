"""Source text, spans and diagnostics: the one way planc points at a place in a `.plan` file."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True, order=True)
class Span:
    """A range of a source file; lines and columns are 1-based, `end_col` is exclusive."""

    file: str
    line: int
    col: int
    end_line: int
    end_col: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"

    @staticmethod
    def whole_file(file: str) -> Span:
        return Span(file, 1, 1, 1, 1)


@dataclass(frozen=True)
class Source:
    """A file's name and text, kept so diagnostics can quote the offending line."""

    name: str
    text: str

    def line(self, number: int) -> str:
        lines = self.text.splitlines()
        return lines[number - 1] if 0 < number <= len(lines) else ""


Severity = Literal["error", "warning", "note"]


@dataclass(frozen=True)
class Diagnostic:
    """One message about the plan, at a span, with optional notes ("did you mean ...")."""

    severity: Severity
    message: str
    span: Span
    notes: tuple[str, ...] = field(default=())

    def render(self, source: Source | None) -> str:
        """`file:line:col: error: message`, the source line, carets under the span, notes."""
        head = f"{self.span}: {self.severity}: {self.message}"
        lines = [head]
        if source is not None and self.span.line > 0:
            text = source.line(self.span.line).replace("\t", " ")
            if text:
                end = self.span.end_col if self.span.end_line == self.span.line else len(text) + 1
                width = max(1, min(end, len(text) + 1) - self.span.col)
                lines.append(f"    {text}")
                lines.append("    " + " " * (self.span.col - 1) + "^" * width)
        lines.extend(f"note: {note}" for note in self.notes)
        return "\n".join(lines)


class PlanError(Exception):
    """Raised when a stage found errors; carries every diagnostic collected so far."""

    def __init__(self, diagnostics: list[Diagnostic]) -> None:
        super().__init__("\n".join(d.message for d in diagnostics))
        self.diagnostics = diagnostics


def did_you_mean(word: str, choices: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """A note suggesting the closest known spelling, if one is close enough."""
    import difflib

    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return (f"did you mean '{close[0]}'?",) if close else ()
