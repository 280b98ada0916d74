"""Parse `.plan` text into the syntax tree of `dsl/ast.py`, reporting every syntax error found.

The grammar lives in `grammar.lark` beside this file. Lark's LALR parser reports an error and
our handler skips the offending token, so one run lists each broken line instead of stopping
at the first.
"""

from __future__ import annotations

import ast as python_ast
import re
from functools import lru_cache
from pathlib import Path

from lark import Lark, Token, Transformer, Tree, UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken, v_args
from lark.tree import Meta

from planc.dsl import ast
from planc.dsl.source import Diagnostic, PlanError, Source, Span

GRAMMAR = Path(__file__).with_name("grammar.lark")

#: How terminals read in "expected ..." messages.
_TERMINAL_NAMES = {
    "NAME": "a name",
    "NUMBER": "a number",
    "STRING": "a string",
    "LBRACE": "'{'",
    "RBRACE": "'}'",
    "LPAR": "'('",
    "RPAR": "')'",
    "LSQB": "'['",
    "RSQB": "']'",
    "EQUAL": "'='",
    "COLON": "':'",
    "COMMA": "','",
    "SEMICOLON": "';'",
    "VBAR": "'|'",
    "AMPERSAND": "'&'",
    "MINUS": "'-'",
    "OPTIONAL_MARK": "'?'",
    "__ANON_0": "'..'",
    "$END": "end of file",
}


@lru_cache(maxsize=1)
def _lark() -> Lark:
    return Lark(
        GRAMMAR.read_text(),
        parser="lalr",
        propagate_positions=True,
        maybe_placeholders=False,
        cache=True,  # the parse tables in the temp dir: `planc check` starts ~25 ms sooner
    )


def parse(text: str, filename: str = "<plan>") -> ast.Document:
    """Parse plan text; raise `PlanError` listing the first syntax error of every statement."""
    source = Source(filename, text)
    errors: list[Diagnostic] = []
    statements: list[ast.Statement] = []
    for chunk in _statement_chunks(text):
        try:
            tree = _lark().parse(chunk)
        except UnexpectedInput as error:
            errors.append(_syntax_diagnostic(error, source, chunk))
            continue
        statements.extend(_ToAst(filename).transform(tree))
    if errors:
        raise PlanError(errors)
    comments = [
        ast.Comment(str(token), _token_span(token, filename))
        for token in _lark().lex(text, dont_ignore=True)
        if token.type == "COMMENT"
    ]
    return ast.Document(tuple(statements), source, tuple(comments))


_STATEMENT_START = re.compile(r"^(include|model|select|pipeline|target)\b")


def _statement_chunks(text: str) -> list[str]:
    """Split the text into top-level statements, each padded to keep its line numbers.

    A statement starts at a statement keyword on a line of its own at brace depth zero, or at
    the start of a line in column 1 even inside an unclosed brace. Parsing statements one by one
    lets a mistake in one statement be reported without hiding the mistakes in the next.
    """
    lines = text.splitlines(keepends=True)
    starts: list[int] = []
    depth = 0
    for number, line in enumerate(lines):
        stripped = line.lstrip()
        if _STATEMENT_START.match(stripped) and (depth <= 0 or line == stripped):
            starts.append(number)
            depth = 0
        depth += _brace_balance(line)
    if not starts or any(line.strip() and not line.lstrip().startswith("#") for line in lines[: starts[0]]):
        starts.insert(0, 0)
    bounds = zip(starts, starts[1:] + [len(lines)])
    return ["\n" * first + "".join(lines[first:last]) for first, last in bounds]


def _brace_balance(line: str) -> int:
    """Opening minus closing braces on a line, ignoring strings and comments."""
    code = re.sub(r'"([^"\\\n]|\\.)*"', "", line).split("#", 1)[0]
    return code.count("{") - code.count("}")


def parse_file(path: str | Path) -> ast.Document:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PlanError([Diagnostic("error", f"no such file: {path}", Span.whole_file(str(path)))]) from None
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
        raise PlanError([Diagnostic("error", f"cannot read {path}: {reason}", Span.whole_file(str(path)))]) from None
    return parse(text, str(path))


# ----------------------------------------------------------------------------- syntax errors


def _syntax_diagnostic(error: UnexpectedInput, source: Source, chunk: str) -> Diagnostic:
    at_end = isinstance(error, UnexpectedEOF) or (isinstance(error, UnexpectedToken) and error.token.type == "$END")
    if at_end and (brace := _unclosed_brace(chunk)) is not None:
        line, col = brace
        return Diagnostic("error", "this '{' is never closed", Span(source.name, line, col, line, col + 1))
    line = max(1, getattr(error, "line", 1) or 1)
    col = max(1, getattr(error, "column", 1) or 1)
    if isinstance(error, UnexpectedCharacters):
        char = chunk[error.pos_in_stream] if error.pos_in_stream < len(chunk) else "?"
        message = f"unexpected character {char!r}"
        width = 1
    elif isinstance(error, UnexpectedEOF):
        line, col = _end_position(chunk)
        message = "unexpected end of file" + _expected(error.expected)
        width = 1
    elif isinstance(error, UnexpectedToken):
        token = error.token
        if token.type == "$END":
            line, col = _end_position(chunk)
            message, width = "unexpected end of file", 1
        else:
            message, width = f"unexpected {_describe(token)}", max(1, len(str(token)))
        message += _expected(error.accepts or error.expected)
    else:  # pragma: no cover - lark raises only the kinds above
        message, width = str(error).splitlines()[0], 1
    return Diagnostic("error", message, Span(source.name, line, col, line, col + width))


def _unclosed_brace(chunk: str) -> tuple[int, int] | None:
    """Line and column of the first '{' without its '}', if any."""
    opened: list[tuple[int, int]] = []
    for number, line in enumerate(chunk.splitlines(), start=1):
        code = re.sub(r'"([^"\\\n]|\\.)*"', lambda m: " " * len(m.group()), line).split("#", 1)[0]
        for col, char in enumerate(code, start=1):
            if char == "{":
                opened.append((number, col))
            elif char == "}" and opened:
                opened.pop()
    return opened[0] if opened else None


def _describe(token: Token) -> str:
    if token.type == "NAME":
        return f"name '{token}'"
    if token.type in ("NUMBER", "STRING"):
        return f"{token.type.lower()} {token}"
    return f"'{token}'"


def _expected(terminals: set[str] | frozenset[str]) -> str:
    names = sorted({_TERMINAL_NAMES.get(t, f"'{t.lower()}'" if t.isupper() else t) for t in terminals})
    keywords = [n for n in names if not n.startswith("a ") and not n.startswith("'") and n != "end of file"]
    names = [n for n in names if n not in keywords] + [f"'{k}'" for k in keywords]
    if not names:
        return ""
    if len(names) > 6:
        names = names[:6] + ["..."]
    return "; expected " + ", ".join(names)


def _end_position(text: str) -> tuple[int, int]:
    lines = text.splitlines() or [""]
    return len(lines), len(lines[-1]) + 1


# ----------------------------------------------------------------------------- tree -> AST


def _token_span(token: Token, filename: str) -> Span:
    return Span(filename, token.line or 1, token.column or 1, token.end_line or 1, token.end_column or 1)


def _meta_span(meta: Meta, filename: str) -> Span:
    if getattr(meta, "empty", True):
        return Span(filename, 1, 1, 1, 1)
    return Span(filename, meta.line, meta.column, meta.end_line, meta.end_column)


@v_args(meta=True)
class _ToAst(Transformer):
    """Turn lark's parse tree into `dsl.ast` nodes with spans."""

    def __init__(self, filename: str) -> None:
        super().__init__()
        self.filename = filename

    def _span(self, meta: Meta) -> Span:
        return _meta_span(meta, self.filename)

    def _tok(self, token: Token) -> Span:
        return _token_span(token, self.filename)

    # statements
    def start(self, meta, children):
        return children

    def include(self, meta, children):
        return ast.Include(self._string(children[0]), self._span(meta))

    def model(self, meta, children):
        name, call, *rest = children
        return ast.ModelStmt(str(name), call, rest[0] if rest else None, self._span(meta), self._tok(name))

    def select(self, meta, children):
        optional = len(children) == 3
        name, selector = children[-2], children[-1]
        return ast.SelectStmt(str(name), optional, selector, self._span(meta), self._tok(name))

    def pipeline(self, meta, children):
        return ast.PipelineStmt(tuple(children), self._span(meta))

    def target(self, meta, children):
        kind, body = children
        return ast.TargetStmt(str(kind), body, self._span(meta), self._tok(kind))

    def step(self, meta, children):
        name, *rest = children
        body = rest.pop() if rest and isinstance(rest[-1], ast.Block) else None
        selector = rest[0] if rest else None
        return ast.Step(str(name), selector, body, self._span(meta), self._tok(name))

    # selectors
    def sel_name(self, meta, children):
        return ast.SelName(str(children[0]), self._span(meta))

    def sel_call(self, meta, children):
        func, *args = children
        return ast.SelCall(str(func), tuple(args), self._span(meta), self._tok(func))

    def _binary(op: str):  # noqa: N805 - a factory of transformer methods
        def method(self, meta, children):
            return ast.SelBinary(op, children[0], children[1], self._span(meta))

        return method

    sel_union = _binary("|")
    sel_diff = _binary("-")
    sel_inter = _binary("&")

    # blocks
    def block(self, meta, children):
        return ast.Block(tuple(children), self._span(meta))

    def key(self, meta, children):
        return children[0]

    def option(self, meta, children):
        key, value = children
        return ast.Option(str(key), value, self._tok(key), self._span(meta))

    def sub_block(self, meta, children):
        key, block = children
        return ast.SubBlock(str(key), block, self._tok(key), self._span(meta))

    def input_decl(self, meta, children):
        name, dtype, *dims = children
        return ast.InputDecl(str(name), str(dtype), tuple(dims), self._span(meta), self._tok(dtype))

    def dim(self, meta, children):
        token = children[0]
        return int(token) if token.type == "NUMBER" and str(token).isdigit() else str(token)

    def call(self, meta, children):
        func, *args = children
        return ast.Call(str(func), tuple(args), self._span(meta), self._tok(func))

    def arg(self, meta, children):
        if len(children) == 2:
            return ast.Arg(str(children[0]), children[1], self._span(meta))
        return ast.Arg(None, children[0], self._span(meta))

    # values
    def number(self, meta, children):
        return ast.Number(str(children[0]), self._span(meta))

    def string(self, meta, children):
        return self._string(children[0])

    def _string(self, token: Token) -> ast.String:
        return ast.String(python_ast.literal_eval(str(token)), self._tok(token))

    def ident(self, meta, children):
        return ast.Ident(str(children[0]), self._span(meta))

    def range(self, meta, children):
        first, last = children
        return ast.Range(ast.Number(str(first), self._tok(first)), ast.Number(str(last), self._tok(last)), self._span(meta))

    def list(self, meta, children):
        return ast.ListValue(tuple(children), self._span(meta))

    def __default__(self, data, children, meta):  # pragma: no cover - every rule is handled
        return Tree(data, children, meta)
