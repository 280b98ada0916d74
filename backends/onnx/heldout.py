"""Held-out text must share no text with what the plan calibrates or trains on.

A model verified on text it was calibrated or trained on is not verified, and comparing paths
proves nothing (a copy under another name passes), so `planc check` compares contents:

- `verify.data` (one sample per line) against each source line by line: any shared line of
  `MIN_LINE` characters or more (whitespace collapsed, case folded) is an error;
- `decode.heldout` (documents) against each source by runs of characters: every `WINDOW`-character
  window of the held-out text (whitespace collapsed) is hashed, and each source's windows every
  `STRIDE` characters, so any shared run of `SHARED_RUN` characters or more is an error.

The sources are every pipeline step's `calibration` and every training target's `data.path`
(files, folders read as the trainer reads them, or `stdlib`); a training target's `data.exclude`
clears a verify file, since those sentences are removed before training. Hash sets of a few MB
of text: cheap enough for `planc check`, and torch-free.
"""

from __future__ import annotations

import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from planc.compiler import ir
from planc.compiler.textdata import STDLIB, stdlib_text
from planc.dsl.source import Diagnostic, Span

#: Shorter lines (after whitespace is collapsed) are too common to mean a copy ("Thank you.").
MIN_LINE = 20
#: Decoder text: held-out windows of `WINDOW` characters, source windows every `STRIDE`.
WINDOW, STRIDE = 64, 32
#: The shortest shared run of characters that is always found.
SHARED_RUN = WINDOW + STRIDE - 1
#: Standard library text read for a `calibration = stdlib` (the calibration windows are cut
#: from its first MiB, or a few MiB for thousands of samples).
STDLIB_CALIBRATION_BYTES = 4 << 20


@dataclass(frozen=True)
class Source:
    """Text the plan calibrates or trains on, and how a diagnostic names it."""

    what: str
    read: Callable[[], list[str]]
    #: Files whose lines a trainer removes from this source before training (`data.exclude`).
    excluded: frozenset[Path] = frozenset()


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def training_documents(path: str, glob: str, max_bytes: int, base: Path) -> list[str]:
    """The text a training target reads, as `planc_runtime.data.read_documents` reads it (sorted
    files, the standard library's without site-packages, `max_bytes` in all); that package
    imports no planc, so the rule is restated here and a test keeps the two equal."""
    if path == STDLIB:
        root = Path(sysconfig.get_paths()["stdlib"])
        files = sorted(p for p in root.rglob(glob) if "site-packages" not in p.parts and p.is_file())
    else:
        root = Path(path) if Path(path).is_absolute() else base / path
        files = [root] if root.is_file() else sorted(p for p in root.rglob(glob) if p.is_file()) if root.is_dir() else []
    documents, total = [], 0
    for file in files:
        if total >= max_bytes:
            break
        try:
            data = file.read_bytes()[: max_bytes - total]
        except OSError:
            continue
        if data:
            documents.append(data.decode("utf-8", errors="replace"))
            total += len(data)
    return documents


def sources(plan: ir.Plan) -> list[Source]:
    """Everything the plan calibrates or trains on."""
    base = plan.model.base_dir
    found = []
    for step in plan.pipeline:
        calibration = getattr(step.options, "calibration", None)
        if not calibration:
            continue
        what = f"the calibration {'text' if calibration == STDLIB else 'file'} of '{step.name}' (line {step.span.line})"
        if calibration == STDLIB:
            found.append(Source(what, lambda: [stdlib_text(STDLIB_CALIBRATION_BYTES)]))
        else:
            file = base / calibration
            found.append(Source(what, lambda file=file: [_read(file)]))
    for target in plan.targets:
        data = getattr(target.options, "data", None)
        if data is None or not hasattr(data, "path"):
            continue
        excluded = frozenset((base / name).resolve() for name in getattr(data, "exclude", ()))
        found.append(Source(f"the training data of 'target {target.kind}' (line {target.span.line})",
                            lambda data=data: training_documents(data.path, data.glob, data.max_bytes, base), excluded))
    return found


def _line_key(line: str) -> str:
    return " ".join(line.split()).casefold()


def _lines(texts: list[str]) -> set[str]:
    return {key for text in texts for key in map(_line_key, text.splitlines()) if len(key) >= MIN_LINE}


def _windows(texts: list[str], stride: int) -> set[int]:
    """Hashes of the `WINDOW`-character windows, every `stride` characters, of each text."""
    found: set[int] = set()
    for text in texts:
        flat = " ".join(text.split())
        found.update(hash(flat[i : i + WINDOW]) for i in range(0, len(flat) - WINDOW + 1, stride))
    return found


def _shared_run(held: set[int], texts: list[str]) -> tuple[int, str] | None:
    """(windows shared, the first shared one) of `texts` against the held-out window hashes."""
    count, first = 0, None
    for text in texts:
        flat = " ".join(text.split())
        for i in range(0, len(flat) - WINDOW + 1, STRIDE):
            if hash(flat[i : i + WINDOW]) in held:
                count += 1
                first = first or flat[i : i + WINDOW]
    return (count, first) if count else None


def heldout_overlaps(plan: ir.Plan, name: str, span: Span, decoder: bool) -> list[Diagnostic]:
    """Errors at `span` for each source that `name` (verify data, or a decoder's held-out
    text: a file or a folder of files) shares text with; none when `name` cannot be read."""
    held_path = plan.model.base_dir / name
    if held_path.is_dir():
        texts = [_read(p) for p in sorted(held_path.iterdir()) if p.is_file()]
    elif held_path.is_file():
        texts = [_read(held_path)]
    else:
        return []  # reported as missing
    label = "held-out text" if decoder else "verification data"
    held_lines = set() if decoder else _lines(texts)
    held_windows = _windows(texts, 1) if decoder else set()
    problems = []
    for source in sources(plan):
        if not decoder and held_path.resolve() in source.excluded:
            continue
        if decoder:
            shared = _shared_run(held_windows, source.read())
            if shared is None:
                continue
            count, first = shared
            message = f"shares {count} runs of {SHARED_RUN}+ characters with"
        else:
            common = held_lines & _lines(source.read())
            if not common:
                continue
            count, first = len(common), min(common)
            message = f"shares {count} line{'s' if count > 1 else ''} with"
        problems.append(Diagnostic(
            "error",
            f"the {label} '{name}' {message} {source.what}: a model verified on what it was "
            f"{'trained' if 'training' in source.what else 'calibrated'} on is not verified",
            span,
            (f"shared: {first!r}", "verify on held-out text, e.g. examples/data/dev_sentences.txt"
             if not decoder else "hold out text the plan neither calibrates nor trains on"),
        ))
    return problems
