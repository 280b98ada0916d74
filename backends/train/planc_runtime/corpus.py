"""Sentence mining for encoder distillation, run before training starts.

An encoder is distilled on sentences, not packed token streams: every sample is one sentence
of everyday-length prose, padded per batch. The text comes from the plan's own files and from
prose already on the machine; nothing is downloaded.

collect_sentences    the plan's `data` block as distinct prose sentences (cached: reading the
                     machine's documentation takes a minute)
prose_sentences      the filter: sentence split, length, and "looks like language"
CORPORA              offline prose by name: docstrings, pydoc_topics, system_docs, everyday
                     (everyday_text.py, planc's own grammar, next to this module)
augment_sentence     word_dropout, span_shuffle, word_swap (with vocabulary_words)
planc_cache_dir      where the sentence cache (and the teacher cache) live
"""

from __future__ import annotations

import json
import os
import random
import re
import sys
import sysconfig
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any


#: Sentence boundaries: end punctuation, space, then a capital letter or a quote.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")
#: Fragments that are code, markup, paths or addresses rather than prose.
_NOT_PROSE = re.compile(r"[{}\[\]<>=_`|\\#@*$~^]|\(\)|>>>|::|\.\.\.|\w\.\w|https?:|www\.|--|\d{4,}")
#: Files under /usr/share/doc worth reading (the rest is binary, HTML or code).
_DOC_NAMES = re.compile(r"(readme|news|changelog|changes|copyright|faq|authors|thanks|todo|history|usage)"
                        r"|\.(txt|md|rst)(\.gz)?$", re.IGNORECASE)


def prose_sentences(text: str, min_words: int, max_words: int) -> list[str]:
    """The prose sentences of a text: split at sentence ends inside paragraphs, keeping only
    sentences of `min_words`..`max_words` words that start with a capital, end with . ! or ?,
    are ASCII and look like language (mostly alphabetic words, no code or markup)."""
    found = []
    for paragraph in re.split(r"\n\s*\n", text):
        flat = " ".join(paragraph.split())
        for sentence in _SENTENCE_END.split(flat):
            words = sentence.split()
            if not (min_words <= len(words) <= max_words):
                continue
            if not sentence[0].isupper() or sentence[-1] not in ".!?" or not sentence.isascii():
                continue
            if _NOT_PROSE.search(sentence):
                continue
            alphabetic = sum(1 for w in words if w.strip(".,;:!?\"'()").isalpha())
            if alphabetic < 0.8 * len(words) or sum(1 for w in words if w.isupper() and len(w) > 1) > 0.3 * len(words):
                continue
            found.append(sentence)
    return found


def _read_text(path: Path, limit: int) -> str:
    """A text file's contents (gzip-compressed ones too), at most `limit` bytes, '' if unreadable."""
    import gzip

    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as handle:
                data = handle.read(limit)
        else:
            with path.open("rb") as handle:
                data = handle.read(limit)
    except (OSError, EOFError):
        return ""
    if b"\0" in data[:1024]:
        return ""  # binary
    return data.decode("utf-8", errors="ignore")


def _stdlib_docstrings() -> Iterator[str]:
    import ast

    root = Path(sysconfig.get_paths()["stdlib"])
    skipped = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
    for path in sorted(root.rglob("*.py")):
        if skipped.intersection(path.relative_to(root).parts[:-1]):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, ValueError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=True)
                if doc:
                    yield doc


def _pydoc_topics() -> Iterator[str]:
    import pydoc_data.topics

    for topic in sorted(pydoc_data.topics.topics):
        yield pydoc_data.topics.topics[topic]


def _system_docs(root: Path = Path("/usr/share/doc")) -> Iterator[str]:
    if not root.is_dir():
        return
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink() and _DOC_NAMES.search(path.name):
            text = _read_text(path, 2_000_000)
            if text:
                yield text


def _everyday() -> Iterator[str]:
    from . import everyday_text

    yield from everyday_text.sentences()


#: Offline prose the `corpora` option names.
CORPORA: dict[str, Callable[[], Iterator[str]]] = {
    "docstrings": _stdlib_docstrings,
    "pydoc_topics": _pydoc_topics,
    "system_docs": _system_docs,
    "everyday": _everyday,
}


def _normalized(sentence: str) -> str:
    return " ".join(sentence.lower().split())


def planc_cache_dir() -> Path:
    """planc's cache folder: $PLANC_CACHE, else $XDG_CACHE_HOME/planc, else ~/.cache/planc."""
    root = os.environ.get("PLANC_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "planc"
    return Path(root)


def _sources_stamp(data: dict[str, Any], base: Path) -> str:
    """What the collected sentences depend on: options, Python, and the files' names/sizes/times."""
    import hashlib

    digest = hashlib.sha256(json.dumps({k: data.get(k) for k in (
        "path", "glob", "corpora", "exclude", "min_words", "max_words", "max_bytes")}, sort_keys=True).encode())
    digest.update(sys.version.encode())
    roots = [Path(n) if Path(n).is_absolute() else base / n for n in data.get("exclude", [])]
    if data["path"] != "stdlib":
        roots.append(Path(data["path"]) if Path(data["path"]).is_absolute() else base / data["path"])
    if "system_docs" in data.get("corpora", []):
        roots.append(Path("/usr/share/doc"))
    if "everyday" in data.get("corpora", []):
        digest.update(Path(__file__).with_name("everyday_text.py").read_bytes())  # the grammar itself
    for root in roots:
        for path in [root] if root.is_file() else sorted(root.rglob("*")) if root.is_dir() else []:
            if path.is_file():
                stat = path.stat()
                digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()[:20]


def collect_sentences(data: dict[str, Any], base: Path, cache: bool = True) -> list[str]:
    """Distinct training sentences of the plan's `data` block, in a stable order.

    The plan's own text (`path`: a file, a folder of `glob` files, or `stdlib` for the standard
    library's docstrings) is kept whole; sentences of `corpora` are mixed in by a seeded
    shuffle until `max_bytes` are collected. Every sentence of an `exclude` file is left out.
    Reading the machine's documentation takes a minute, so the result is cached (by the
    options and the names, sizes and times of the files read) under planc_cache_dir().
    """
    path = planc_cache_dir() / "corpus" / f"{_sources_stamp(data, base)}.json"
    if cache and path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    sentences = _collect_sentences(data, base)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(sentences), encoding="utf-8")
        os.replace(tmp, path)
    return sentences


def _collect_sentences(data: dict[str, Any], base: Path) -> list[str]:
    low, high = data.get("min_words", 5), data.get("max_words", 60)
    excluded = set()
    for name in data.get("exclude", []):
        path = Path(name) if Path(name).is_absolute() else base / name
        if not path.is_file():
            raise FileNotFoundError(f"data.exclude names {path}, which does not exist")
        for line in path.read_text(encoding="utf-8").splitlines():
            excluded.add(_normalized(line))
            excluded.update(_normalized(s) for s in prose_sentences(line, 1, 10_000))
    seen: set[str] = set()

    def take(texts: Iterator[str], budget: int) -> list[str]:
        found = []
        for text in texts:
            for sentence in prose_sentences(text, low, high):
                key = _normalized(sentence)
                if key not in seen and key not in excluded:
                    seen.add(key)
                    found.append(sentence)
                    budget -= len(sentence) + 1
            if budget <= 0:
                break
        return found

    if data["path"] == "stdlib":
        own = take(_stdlib_docstrings(), data["max_bytes"])
    else:
        root = Path(data["path"]) if Path(data["path"]).is_absolute() else base / data["path"]
        files = [root] if root.is_file() else sorted(p for p in root.rglob(data.get("glob", "*.txt")) if p.is_file())
        if not files:
            raise FileNotFoundError(f"training data {root} does not exist or holds no {data.get('glob')} files")
        # One sentence per line is the usual layout of a sentence file: lines are paragraphs.
        own = take(("\n\n".join(_read_text(f, data["max_bytes"]).splitlines()) for f in files), data["max_bytes"])
    extra: list[str] = []
    for name in data.get("corpora", []):
        if name not in CORPORA:
            raise ValueError(f"unknown corpus {name!r}; known: {sorted(CORPORA)}")
        extra += take(CORPORA[name](), 1 << 62)  # all of it: the shuffle below mixes every file in
    random.Random(0).shuffle(extra)
    budget = data["max_bytes"] - sum(len(s) + 1 for s in own)
    for i, sentence in enumerate(extra):
        budget -= len(sentence) + 1
        if budget < 0:
            extra = extra[:i]
            break
    sentences = own + extra
    if not sentences:
        raise ValueError(f"no sentences of {low}-{high} words in the training data ({data['path']}, {data.get('corpora')})")
    return sentences


def augment_sentence(sentence: str, kind: str, rng: random.Random, vocabulary: Sequence[str] = ()) -> str:
    """An altered copy of `sentence`.

    `word_dropout` drops ~10% of its words (keeping at least four); `span_shuffle` swaps two
    adjacent spans of words; `word_swap` replaces ~20% of its words by random whole words of the
    model's vocabulary, so the student meets words the corpus lacks, in context.
    """
    words = sentence.split()
    if kind == "word_dropout":
        drop = max(1, round(0.1 * len(words)))
        if len(words) - drop < 4:
            return sentence
        gone = set(rng.sample(range(len(words)), drop))
        return " ".join(w for i, w in enumerate(words) if i not in gone)
    if kind == "span_shuffle":
        if len(words) < 4:
            return sentence
        cut = rng.randrange(1, len(words) - 1)
        start = rng.randrange(0, cut)
        end = rng.randrange(cut + 1, len(words) + 1)
        return " ".join(words[:start] + words[cut:end] + words[start:cut] + words[end:])
    if kind == "word_swap":
        if not vocabulary:
            raise ValueError("word_swap needs the model's vocabulary")
        common = vocabulary[:WORD_SWAP_VOCABULARY]
        out = []
        for word in words:
            core = word.strip(".,;:!?\"'()")
            if core.isalpha() and rng.random() < WORD_SWAP_RATE:
                new = rng.choice(common)
                out.append(word.replace(core, new.capitalize() if core[0].isupper() else new, 1))
            else:
                out.append(word)
        return " ".join(out)
    raise ValueError(f"unknown augmentation {kind!r}: word_dropout, span_shuffle or word_swap")


#: word_swap: the share of words replaced, and how many of the vocabulary's first (for WordPiece
#: vocabularies: most frequent) whole words replacements are drawn from.
WORD_SWAP_RATE = 0.2
WORD_SWAP_VOCABULARY = 8000


def vocabulary_words(tokenizer: Any) -> list[str]:
    """Whole lowercase words of at least three letters of a WordPiece/BPE vocabulary, in id
    order (BERT's vocabulary lists words by frequency, so the first ones are the common ones)."""
    ordered = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    words = [w.lstrip("\u0120") for w, _ in ordered]
    return list(dict.fromkeys(w for w in words if len(w) >= 3 and w.isascii() and w.isalpha() and w.islower()))
