"""The canonical pretty-printer behind `planc fmt` and `planc explain`.

One layout for every plan: two-space indents, one statement per paragraph, one pipeline step
per line, short option blocks inline (`{ method = magnitude, sparsity = 50% }`), long ones one
option per line. Comments stay with the line they were on. Formatting is idempotent and
`parse(format(doc)) == doc` (spans aside).
"""

from __future__ import annotations

import re

from planc.dsl import ast

INDENT = "  "
INLINE_LIMIT = 100
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_PRECEDENCE = {"|": 1, "-": 1, "&": 2}


def format_document(document: ast.Document) -> str:
    printer = _Printer(list(document.comments))
    previous: ast.Statement | None = None
    for statement in document.statements:
        grouped = isinstance(statement, type(previous)) and isinstance(statement, (ast.Include, ast.SelectStmt))
        if previous is not None and not grouped:
            printer.lines.append("")
        printer.statement(statement)
        previous = statement
    printer.comments_before(10**9, 0)
    return "\n".join(printer.lines).rstrip("\n") + "\n"


def format_value(value: ast.Value) -> str:
    if isinstance(value, ast.Number):
        return value.text
    if isinstance(value, ast.String):
        return quote(value.value)
    if isinstance(value, ast.Ident):
        return value.name
    if isinstance(value, ast.Range):
        return f"{value.first.text}..{value.last.text}"
    return "[" + ", ".join(format_value(item) for item in value.items) + "]"


def quote(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def format_selector(expr: ast.SelExpr, parent: int = 0, right: bool = False) -> str:
    if isinstance(expr, ast.SelName):
        return expr.name
    if isinstance(expr, ast.SelCall):
        return f"{expr.func}(" + ", ".join(format_value(a) for a in expr.args) + ")"
    level = _PRECEDENCE[expr.op]
    text = f"{format_selector(expr.left, level)} {expr.op} {format_selector(expr.right, level, right=True)}"
    needs_parens = level < parent or (right and level == parent)
    return f"({text})" if needs_parens else text


class _Printer:
    def __init__(self, comments: list[ast.Comment]) -> None:
        self.lines: list[str] = []
        self.comments = sorted(comments, key=lambda c: (c.span.line, c.span.col))

    # comments -------------------------------------------------------------------------------

    def comments_before(self, line: int, depth: int) -> None:
        while self.comments and self.comments[0].span.line < line:
            self.lines.append(INDENT * depth + self.comments.pop(0).text)

    def trailing_comment(self, line: int) -> str:
        if self.comments and self.comments[0].span.line == line:
            return "  " + self.comments.pop(0).text
        return ""

    def has_comment_within(self, first: int, last: int) -> bool:
        return any(first <= c.span.line <= last for c in self.comments)

    def emit(self, depth: int, text: str, span_line: int, end_line: int) -> None:
        """One output line for a node spanning `span_line..end_line` of the original."""
        self.comments_before(span_line, depth)
        self.lines.append(INDENT * depth + text + self.trailing_comment(end_line))

    # statements -----------------------------------------------------------------------------

    def statement(self, statement: ast.Statement) -> None:
        line = statement.span.line
        if isinstance(statement, ast.Include):
            self.emit(0, f"include {quote(statement.path.value)}", line, statement.span.end_line)
        elif isinstance(statement, ast.SelectStmt):
            mark = "?" if statement.optional else ""
            self.emit(0, f"select{mark} {statement.name} = {format_selector(statement.selector)}", line, statement.span.end_line)
        elif isinstance(statement, ast.ModelStmt):
            call = statement.source
            args = ", ".join((f"{a.key} = " if a.key else "") + format_value(a.value) for a in call.args)
            self.block_statement(f"model {statement.name} = {call.func}({args})", statement.body, statement.span)
        elif isinstance(statement, ast.PipelineStmt):
            self.comments_before(line, 0)
            self.lines.append("pipeline {")
            for step in statement.steps:
                self.step(step)
            self.comments_before(statement.span.end_line, 1)
            self.lines.append("}" + self.trailing_comment(statement.span.end_line))
        else:
            self.block_statement(f"target {statement.kind}", statement.body, statement.span, inline=False)

    def block_statement(self, head: str, body: ast.Block | None, span, inline: bool = True) -> None:
        if body is None:
            self.emit(0, head, span.line, span.end_line)
            return
        inline_text = self.inline_block(body) if inline else None
        if inline_text is not None and len(head) + len(inline_text) + 1 <= INLINE_LIMIT:
            self.emit(0, f"{head} {inline_text}", span.line, span.end_line)
            return
        self.emit(0, head + " {", span.line, span.line)
        self.entries(body, 1)
        self.comments_before(body.span.end_line, 1)
        self.lines.append("}" + self.trailing_comment(body.span.end_line))

    def step(self, step: ast.Step) -> None:
        head = step.name + (f" {format_selector(step.selector)}" if step.selector is not None else "")
        if step.body is None:
            self.emit(1, head + ";", step.span.line, step.span.end_line)
            return
        inline_text = self.inline_block(step.body)
        if inline_text is not None and len(INDENT) + len(head) + len(inline_text) + 1 <= INLINE_LIMIT:
            self.emit(1, f"{head} {inline_text}", step.span.line, step.span.end_line)
            return
        self.emit(1, head + " {", step.span.line, step.span.line)
        self.entries(step.body, 2)
        self.comments_before(step.body.span.end_line, 2)
        self.lines.append(INDENT + "}" + self.trailing_comment(step.body.span.end_line))

    # blocks ---------------------------------------------------------------------------------

    def inline_block(self, block: ast.Block) -> str | None:
        """`{ a = 1, b = 2 }` when the block is flat and has no comments inside, else None."""
        if not block.entries:
            return "{ }"
        if block.span.line != block.span.end_line and self.has_comment_within(block.span.line, block.span.end_line):
            return None
        parts = []
        for entry in block.entries:
            if isinstance(entry, ast.SubBlock):
                nested = self.inline_block(entry.block)
                if nested is None or any(isinstance(e, ast.SubBlock) for e in entry.block.entries):
                    return None
                parts.append(f"{entry.key} {nested}")
            else:
                parts.append(self.entry_text(entry))
        text = "{ " + ", ".join(parts) + " }"
        return text if len(text) <= INLINE_LIMIT else None

    def entries(self, block: ast.Block, depth: int) -> None:
        for entry in block.entries:
            if isinstance(entry, ast.SubBlock):
                nested = self.inline_block(entry.block)
                head = f"{entry.key} "
                if nested is not None and len(INDENT * depth) + len(head) + len(nested) <= INLINE_LIMIT:
                    self.emit(depth, head + nested, entry.span.line, entry.span.end_line)
                else:
                    self.emit(depth, head + "{", entry.span.line, entry.span.line)
                    self.entries(entry.block, depth + 1)
                    self.comments_before(entry.block.span.end_line, depth + 1)
                    self.lines.append(INDENT * depth + "}" + self.trailing_comment(entry.block.span.end_line))
            else:
                self.emit(depth, self.entry_text(entry), entry.span.line, entry.span.end_line)

    @staticmethod
    def entry_text(entry: ast.Option | ast.InputDecl) -> str:
        if isinstance(entry, ast.InputDecl):
            return f"{entry.name}: {entry.dtype}[" + ", ".join(str(d) for d in entry.dims) + "]"
        return f"{entry.key} = {format_value(entry.value)}"
