"""Content-addressed cache of trained weights, so compiling the same plan twice trains once.

The key hashes everything that decides the result: the resolved plan text (model, passes,
training target, all defaults filled in) and the model's own files (the factory's source or
the Hugging Face directory's weights and config). Entries are written atomically.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from compiler.ir import ModelSource

#: Bump when the training program changes in a way that changes its results.
CACHE_VERSION = "1"


def cache_dir() -> Path:
    root = os.environ.get("PLANC_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "planc"
    return Path(root) / "trained"


def plan_key(resolved_plan: str, model: ModelSource) -> str:
    digest = hashlib.sha256(f"planc-train-v{CACHE_VERSION}\n{resolved_plan}".encode())
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
        path = model.base_dir / module
        return [path] if path.is_file() else []
    if model.package:
        import importlib.util

        spec = importlib.util.find_spec(model.package)
        if spec is None or spec.origin is None:
            return []
        directory = Path(spec.origin).parent
    else:
        directory = model.base_dir / model.ref
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix in (".json", ".safetensors", ".bin", ".txt"))


def cached_weights(key: str) -> Path | None:
    path = cache_dir() / f"{key}.pt"
    return path if path.is_file() else None


def store_weights(key: str, weights: Path) -> Path:
    """Copy `weights` into the cache under `key`; returns the cached file."""
    target = cache_dir() / f"{key}.pt"
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.copyfile(weights, temporary)
    os.replace(temporary, target)
    return target
