"""Offline text for planc: example inputs for capture, and corpora that need no download.

Capture needs realistic inputs (real tokens, ragged lengths so padding appears); training,
calibration and distillation need a corpus. Everything here comes either from this file or
from the Python installation itself, so it works on a machine with no network:

- `EXAMPLE_SENTENCES` / `EXAMPLE_CODE`: a handful of texts of varied length used to build the
  example batch a model is captured with (prose for encoders, code for byte-level decoders).
- `stdlib_documents` / `stdlib_text`: the standard library's `.py` sources.
- `stdlib_docstrings`: English sentences taken from its docstrings and from `pydoc_data.topics`.

The bundled sentence files of the examples live in `examples/data/` (see its README).
"""

from __future__ import annotations

import ast
import logging
import re
import sysconfig
from pathlib import Path

logger = logging.getLogger(__name__)

#: The value of `calibration`/`data.path` that names the standard library's sources, not a file.
STDLIB = "stdlib"
#: Tokens per window (and windows when no count is given) of the `stdlib` samples.
STDLIB_WINDOW, STDLIB_WINDOWS = 128, 32

#: Prose of very different lengths: a batch of them always has padding.
EXAMPLE_SENTENCES: tuple[str, ...] = (
    "The train was late again this morning.",
    "Rain is expected over the weekend, so the picnic has moved indoors to the community hall.",
    "She fixed the bike herself.",
    "After three weeks of testing, the team finally found the memory leak hiding in the image "
    "cache and shipped a patch before the holidays.",
    "Please water the tomatoes while I am away.",
    "How many languages do you speak?",
)

#: Short Python fragments, the kind of text the example byte-level decoder is trained on.
EXAMPLE_CODE: tuple[str, ...] = (
    "import os\n",
    "def main(argv=None):\n    args = parse_args(argv)\n    return run(args)\n",
    "for key, value in sorted(items.items()):\n    print(key, value)\n",
    "class Point:\n    x: float = 0.0\n",
    "if __name__ == '__main__':\n    sys.exit(main())\n",
    "with open(path, encoding='utf-8') as handle:\n    text = handle.read()\n",
)

#: Folders of the standard library that are not ordinary library code (huge test suites,
#: third-party installs, byte code).
_SKIPPED_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3"}
)


def stdlib_dir() -> Path:
    """The directory of this interpreter's standard library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """Every `.py` file of the standard library outside test suites, in a stable order."""
    root = stdlib_dir()
    files = [
        path
        for path in root.rglob("*.py")
        if not _SKIPPED_DIRS.intersection(path.relative_to(root).parts[:-1])
    ]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def stdlib_documents(max_bytes: int) -> list[str]:
    """Standard library source files as separate documents, at most `max_bytes` (UTF-8) in all.

    Documents stay whole except the last, which is cut to fit; the order is stable, so a
    held-out split taken from the end is the same on every machine with the same Python.
    """
    if max_bytes <= 0:
        return []
    documents: list[str] = []
    used = 0
    for path in stdlib_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        size = len(text.encode("utf-8"))
        if used + size > max_bytes:
            remaining = max_bytes - used
            documents.append(text.encode("utf-8")[:remaining].decode("utf-8", errors="ignore"))
            break
        documents.append(text)
        used += size
    if not documents:
        raise FileNotFoundError(f"no Python sources found under {stdlib_dir()}")
    return documents


def stdlib_text(max_bytes: int) -> str:
    """The standard library sources concatenated (blank line between files), `max_bytes` at most."""
    return "\n\n".join(stdlib_documents(max_bytes)).encode("utf-8")[:max_bytes].decode(
        "utf-8", errors="ignore"
    )


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_CODE_LIKE = re.compile(r"[{}\[\]<>=_`|\\]|\(\)|>>>|::|\.\.\.|\w\.\w")


def _sentences(text: str, min_words: int, max_words: int) -> list[str]:
    """Prose sentences of a paragraph-y text: code-like fragments and odd lengths dropped."""
    flat = " ".join(text.split())
    result = []
    for candidate in _SENTENCE_END.split(flat):
        words = candidate.split()
        if not (min_words <= len(words) <= max_words):
            continue
        if not candidate[0].isupper() or candidate[-1] not in ".!?":
            continue
        if _CODE_LIKE.search(candidate) or not candidate.isascii():
            continue
        result.append(candidate)
    return result


def _docstrings(source: str) -> list[str]:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, kinds):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                found.append(doc)
    return found


def stdlib_docstrings(limit: int, min_words: int = 5, max_words: int = 40) -> list[str]:
    """Up to `limit` distinct English sentences from `pydoc_data.topics` and stdlib docstrings.

    Prose for encoder calibration and distillation when no text file is given. Deterministic:
    the help topics come first (sorted by topic), then docstrings in file order.
    """
    import pydoc_data.topics

    seen: set[str] = set()
    result: list[str] = []

    def take(text: str) -> bool:
        for sentence in _sentences(text, min_words, max_words):
            if sentence not in seen:
                seen.add(sentence)
                result.append(sentence)
                if len(result) >= limit:
                    return True
        return False

    if limit <= 0:
        return []
    for topic in sorted(pydoc_data.topics.topics):
        for paragraph in pydoc_data.topics.topics[topic].split("\n\n"):
            if take(paragraph):
                return result
    for path in stdlib_files():
        try:
            source = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for doc in _docstrings(source):
            for paragraph in doc.split("\n\n"):
                if take(paragraph):
                    return result
    logger.info("stdlib_docstrings: only %d sentences available (asked for %d)", len(result), limit)
    return result
