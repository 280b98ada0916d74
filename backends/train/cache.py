"""Content-addressed cache of trained weights, so compiling the same plan twice trains once.

The key hashes everything that decides the result: the resolved plan text (model, passes,
training target, all defaults filled in), the model's own files (the factory's source or
the Hugging Face directory's weights and config), the code of the training program (every
file of the runtime package, in sorted order, and the templates train.py is rendered from)
and, for sentence corpora (encoders), a fingerprint of the sentences themselves
(`corpus_fingerprint`: the text on the machine may change while the plan does not). Entries
are written atomically.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from planc.backends.train.shared_modules import SHARED_MODULES, shared_module_file

if TYPE_CHECKING:
    from planc.backends.train.options import TrainTarget
    from planc.compiler.ir import ModelSource

#: The runtime package emit copies next to every train.py (the `everyday` grammar included).
RUNTIME = Path(__file__).parent / "planc_runtime"
#: The code a trained result depends on besides the plan and the runtime: what train.py is rendered from.
_TRAINING_CODE = (
    *sorted((Path(__file__).parent / "render").glob("*.py")),
    Path(__file__).parent / "templates" / "train.py.tmpl",
)

#: Bump when the training program changes in a way that changes its results.
CACHE_VERSION = "1"


def runtime_sources() -> dict[str, Path]:
    """What emit writes into a program's runtime package, {path inside it: planc's file}: the
    package's own files and the shared modules, sorted by path (what plan_key hashes too)."""
    files = {path.relative_to(RUNTIME).as_posix(): path for path in runtime_files()}
    files.update({f"{name}.py": shared_module_file(module) for name, module in SHARED_MODULES.items()})
    return dict(sorted(files.items()))


def runtime_files(root: Path = RUNTIME) -> list[Path]:
    """The files of a runtime package (planc's own, or one emitted next to a train.py), without
    bytecode caches, sorted by their path inside it."""
    files = [p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.relative_to(root).parts]
    return sorted((p for p in files if p.suffix != ".pyc"), key=lambda p: p.relative_to(root).as_posix())


def cache_dir() -> Path:
    root = os.environ.get("PLANC_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "planc"
    return Path(root) / "trained"


def plan_key(resolved_plan: str, model: ModelSource, corpus: str = "") -> str:
    """The cache key of a plan's trained weights; `corpus` is `corpus_fingerprint(...)` (or '')."""
    digest = hashlib.sha256(f"planc-train-v{CACHE_VERSION}\n{resolved_plan}\ncorpus:{corpus}\n".encode())
    for name, path in runtime_sources().items():
        digest.update(f"planc_runtime/{name}\n".encode())
        digest.update(path.read_bytes())
    for path in _TRAINING_CODE:
        digest.update(path.read_bytes())
    for path in _model_files(model):
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:32]


def _model_files(model: ModelSource) -> list[Path]:
    """The files whose content defines the model's starting weights."""
    if model.kind == "factory":
        module = model.ref.rsplit(":", 1)[0]
        # a string argument naming a file (`checkpoint = "../out/teacher.pt"`) is part of the
        # model too: a teacher retrained at the same path must not reuse the old student
        named = [model.base_dir / value for value in model.args.values() if isinstance(value, str)]
        return [path for path in (model.base_dir / module, *named) if _is_file(path)]
    if model.package:
        import importlib.util

        spec = importlib.util.find_spec(model.package)
        if spec is None or spec.origin is None:
            return []
        directory = Path(spec.origin).parent
    else:
        directory = model.base_dir / model.ref
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix in (".json", ".safetensors", ".bin", ".txt"))


def corpus_fingerprint(target: TrainTarget, base_dir: Path, task: str = "encoder") -> str:
    """Digest of the sentences an encoder's `data` block yields ('' for a decoder's packed files,
    which the resolved plan already names). Reads through the runtime's own sentence reader and
    its corpus cache, so it agrees with what training sees; a second call takes a second."""
    if task != "encoder":
        return ""
    from planc.backends.train import planc_runtime

    data: dict[str, Any] = target.data.model_dump()
    for key in ("path",):
        if data[key] != "stdlib":
            data[key] = str((Path(base_dir) / data[key]).resolve())
    data["exclude"] = [str((Path(base_dir) / name).resolve()) for name in data["exclude"]]
    sentences = planc_runtime.collect_sentences(data, Path(base_dir))
    return hashlib.sha256("\n".join(sentences).encode()).hexdigest()[:32]


def cached_weights(key: str) -> Path | None:
    path = cache_dir() / f"{key}.pt"
    return path if path.is_file() else None


def store_weights(key: str, weights: Path) -> Path:
    """Copy `weights` into the cache under `key`; returns the cached file."""
    from planc.compiler.publish import copy_file

    target = cache_dir() / f"{key}.pt"
    target.parent.mkdir(parents=True, exist_ok=True)
    copy_file(weights, target)
    return target


def _is_file(path: Path) -> bool:
    """`path.is_file()`, False for a string argument that cannot be a path (too long, NUL)."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False
