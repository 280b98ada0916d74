"""The model front end: turn a plan's `model` block into an eager model, a tokenizer and a graph.

Steps, each raising `FrontendError` with a message a user can act on (the driver reports it at
the plan's `model` line):

1. `load_model`: run the named factory (a file or an importable module) or load a local Hugging
   Face directory offline; resolve the task (`encoder` or `causal_lm`); check that the model's
   `forward` accepts every declared input; build a tokenizer producing exactly those inputs and
   a realistic, padded example batch; map symbolic dims to `torch.export.Dim`s.
2. `capture`: `torch.export` the model with those dynamic dims; if it refuses, fall back to
   `torch.fx.symbolic_trace`, turning submodules it cannot trace into opaque leaves; check the
   graph against the eager model before handing it on.
3. `model_output` / `embed`: the one tensor verification compares (sentence embeddings for
   encoders, logits for causal LMs), for the eager model, the graph, or any rewrite of it.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib
import importlib.util
import inspect
import io
import json
import logging
import os
import re
import sys
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

from compiler import textdata
from compiler.ir import InputSpec, ModelSource
from dsl.source import did_you_mean

logger = logging.getLogger(__name__)

Task = Literal["encoder", "causal_lm"]

#: Inputs a tokenizer can derive from text. Anything else cannot be fed from a text file.
TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")

_DTYPES = {
    "int64": torch.int64,
    "int32": torch.int32,
    "float32": torch.float32,
    "float16": torch.float16,
    "bool": torch.bool,
}

#: Number of texts in the example batch (more when it would equal the sequence length, which
#: would make torch.export unify the two dims).
_EXAMPLE_BATCH = 4

#: Tolerances of the capture check: the graph computes the same ops as eager, so only
#: reassociation noise is allowed.
_CAPTURE_RTOL = 1e-4
_CAPTURE_ATOL = 1e-4


class FrontendError(Exception):
    """The model named by a plan cannot be loaded, tokenized or captured; the message says why."""


# ----------------------------------------------------------------------------- tokenizers


class Tokenizer(ABC):
    """Text to the model's declared inputs, and ids back to text.

    Subclasses only split text into ids; this base class assembles exactly the inputs the plan
    declares (ids, mask, token types, positions) in the declared dtypes.
    """

    pad_id: int
    eos_id: int | None
    vocab_size: int

    def __init__(self, inputs: tuple[InputSpec, ...], max_length: int | None) -> None:
        self.inputs = inputs
        #: Longest sequence the model accepts; longer texts are truncated.
        self.max_length = max_length

    @abstractmethod
    def _encode(self, texts: list[str], seq: int | None, pad_left: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), both int64 [len(texts), seq or longest]."""

    @abstractmethod
    def decode(self, ids: torch.Tensor | list[int]) -> str:
        """Text of a row of ids, padding and special tokens left out."""

    def encode_batch(self, texts: list[str], seq: int | None = None, pad_left: bool = False) -> dict[str, torch.Tensor]:
        """Tokenize `texts` into the declared inputs, padded to `seq` (or the longest text).

        `pad_left` puts padding before the text, as decoders want for generation.
        """
        if not texts:
            raise FrontendError("cannot tokenize an empty list of texts")
        if seq is not None and seq < 1:
            raise FrontendError(f"sequence length must be at least 1, got {seq}")
        ids, mask = self._encode(list(texts), seq, pad_left)
        produced = {
            "input_ids": ids,
            "attention_mask": mask,
            "token_type_ids": torch.zeros_like(ids),
            "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
        }
        return {spec.name: produced[spec.name].to(_DTYPES[spec.dtype]) for spec in self.inputs}

    def _limit(self, seq: int | None) -> int | None:
        if seq is not None and self.max_length is not None and seq > self.max_length:
            raise FrontendError(f"sequence length {seq} exceeds the model's maximum of {self.max_length} positions")
        return seq if seq is not None else self.max_length


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255, the tokenizer of the example GPT. Id 0 (NUL) pads and ends text."""

    pad_id = 0
    eos_id = 0
    vocab_size = 256

    def _encode(self, texts: list[str], seq: int | None, pad_left: bool) -> tuple[torch.Tensor, torch.Tensor]:
        limit = self._limit(seq)
        rows = [list(text.encode("utf-8"))[:limit] for text in texts]
        width = seq if seq is not None else max(len(row) for row in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.int64)
        mask = torch.zeros((len(rows), width), dtype=torch.int64)
        for i, row in enumerate(rows):
            if not row:
                continue
            span = slice(width - len(row), width) if pad_left else slice(0, len(row))
            ids[i, span] = torch.tensor(row, dtype=torch.int64)
            mask[i, span] = 1
        return ids, mask

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return bytes(v for v in values if 0 < v < 256).decode("utf-8", errors="replace")


class HFTokenizer(Tokenizer):
    """A Hugging Face model's own tokenizer files, loaded offline."""

    def __init__(self, tokenizer: Any, inputs: tuple[InputSpec, ...], max_length: int | None) -> None:
        super().__init__(inputs, max_length)
        self.hf = tokenizer
        if tokenizer.pad_token_id is None:
            # Decoders such as GPT-2 ship without a pad token: pad with end-of-text, masked out.
            if tokenizer.eos_token is None:
                raise FrontendError("the model's tokenizer defines neither a pad nor an end-of-text token")
            tokenizer.pad_token = tokenizer.eos_token
        self.pad_id = int(tokenizer.pad_token_id)
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        self.eos_id = None if eos is None else int(eos)
        self.vocab_size = len(tokenizer)

    def _encode(self, texts: list[str], seq: int | None, pad_left: bool) -> tuple[torch.Tensor, torch.Tensor]:
        limit = self._limit(seq)
        encoded = self.hf(
            texts,
            padding="max_length" if seq is not None else "longest",
            truncation=limit is not None,
            max_length=limit,
            padding_side="left" if pad_left else "right",
            return_attention_mask=True,
            return_tensors="pt",
        )
        return encoded["input_ids"].to(torch.int64), encoded["attention_mask"].to(torch.int64)

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return self.hf.decode(values, skip_special_tokens=True)


# ----------------------------------------------------------------------------- loading


@dataclass
class LoadedModel:
    """Everything later stages need about the plan's model, built once by `load_model`."""

    model: nn.Module
    source: ModelSource
    task: Task
    tokenizer: Tokenizer
    example_inputs: dict[str, torch.Tensor]
    dynamic_shapes: dict[str, dict[int, Any] | None]
    #: Longest sequence the model accepts (position table size), None when unbounded/unknown.
    max_positions: int | None = None
    #: Where the weights came from, for reports: the factory file/module or the HF directory.
    origin: str = ""


def load_model(source: ModelSource, module: nn.Module | None = None) -> LoadedModel:
    """Build the eager model (fp32, eval, CPU), its tokenizer and example inputs for `source`.

    `module` (from the Python API) replaces the plan's factory or weights; it is put in eval
    mode on CPU in fp32 in place. An `hf` source still provides its tokenizer files.
    """
    hf_dir: Path | None = None
    if module is not None:
        if not isinstance(module, nn.Module):
            raise FrontendError(f"the model passed in is a {type(module).__name__}, not a torch.nn.Module")
        model, origin = module, f"{type(module).__name__} passed to compile()"
        hf_config = _hf_config_of(module)
        if source.kind == "hf":
            hf_dir = _hf_model_dir(source)
            if hf_config is None:
                hf_config = _read_hf_config(hf_dir)
    elif source.kind == "factory":
        model, origin = _load_factory(source)
        hf_config = None
    else:
        model, hf_config, hf_dir = _load_hf(source)
        origin = str(hf_dir)
    model = model.to(device="cpu", dtype=torch.float32).eval()
    _check_forward_accepts(model, source)
    max_positions = _max_positions(model, hf_config)

    if hf_dir is None:
        _check_byte_vocab(model, source)
        tokenizer: Tokenizer = ByteTokenizer(source.inputs, max_positions)
    else:
        tokenizer = _load_hf_tokenizer(hf_dir, source, max_positions)

    task = _resolve_task(source, model, hf_config, tokenizer)
    example_inputs = _example_inputs(source, tokenizer, task)
    loaded = LoadedModel(
        model=model,
        source=source,
        task=task,
        tokenizer=tokenizer,
        example_inputs=example_inputs,
        dynamic_shapes=_dynamic_shapes(source.inputs, max_positions),
        max_positions=max_positions,
        origin=origin,
    )
    logger.info(
        "loaded %s model '%s' from %s (%.1fM parameters)",
        task,
        source.name,
        origin,
        sum(p.numel() for p in model.parameters()) / 1e6,
    )
    return loaded


def _load_factory(source: ModelSource) -> tuple[nn.Module, str]:
    """Import the factory named by `ref` and call it with the plan's arguments."""
    if ":" not in source.ref:
        raise FrontendError(
            f"factory reference '{source.ref}' must look like 'path/to/file.py:function' or 'package.module:function'"
        )
    target, _, func_name = source.ref.rpartition(":")
    if not target or not func_name:
        raise FrontendError(f"factory reference '{source.ref}' names no module or no function")
    module, origin = _import_factory_module(target, source.base_dir)
    factory = getattr(module, func_name, None)
    if factory is None:
        names = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        hint = did_you_mean(func_name, names)
        raise FrontendError(
            f"'{origin}' has no function '{func_name}'" + (f" ({hint[0]})" if hint else "")
        )
    if not callable(factory):
        raise FrontendError(f"'{origin}:{func_name}' is a {type(factory).__name__}, not a callable factory")
    try:
        # A fixed seed makes randomly initialised models identical on every load, without
        # disturbing the caller's random state.
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = factory(**source.args)
    except Exception as error:  # the factory is user code: any failure is reported, not raised raw
        raise FrontendError(
            f"factory '{source.ref}' raised {type(error).__name__}: {error}"
        ) from error
    if not isinstance(model, nn.Module):
        raise FrontendError(
            f"factory '{source.ref}' returned a {type(model).__name__}, not a torch.nn.Module"
        )
    return model, f"{origin}:{func_name}"


def _import_factory_module(target: str, base_dir: Path) -> tuple[Any, str]:
    """A module from a file path (relative to the plan) or a dotted module name."""
    looks_like_path = target.endswith(".py") or "/" in target or "\\" in target
    if not looks_like_path:
        try:
            return importlib.import_module(target), target
        except ModuleNotFoundError as error:
            # Not importable: a dotted path to a file next to the plan (`examples.models.gpt`)
            # still works, since example folders are often not packages.
            as_file = base_dir / (target.replace(".", "/") + ".py")
            missing = error.name or ""
            missing_is_target = bool(missing) and (target == missing or target.startswith(missing + "."))
            if not missing_is_target or not as_file.is_file():
                raise FrontendError(
                    f"cannot import factory module '{target}': {error}"
                ) from error
            target = str(as_file)
        except Exception as error:
            raise FrontendError(
                f"importing factory module '{target}' raised {type(error).__name__}: {error}"
            ) from error
    path = Path(target)
    if not path.is_absolute():
        path = base_dir / path
    path = path.resolve()
    if not path.is_file():
        raise FrontendError(f"factory file '{target}' not found (looked for {path})")
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    name = f"planc_factory_{re.sub(r'[^0-9a-zA-Z_]', '_', path.stem)}_{digest}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise FrontendError(f"factory file '{target}' is not a loadable Python module")
    module = importlib.util.module_from_spec(spec)
    # Registered before running it, as dataclasses and pickling look classes up by module name;
    # the file's folder is importable meanwhile so it can import its sibling files.
    sys.modules[name] = module
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        sys.modules.pop(name, None)
        raise FrontendError(
            f"importing factory file '{target}' raised {type(error).__name__}: {error}"
        ) from error
    finally:
        if str(path.parent) in sys.path:
            sys.path.remove(str(path.parent))
    return module, str(path)


def _hf_model_dir(source: ModelSource) -> Path:
    """The directory holding the model's `config.json`: under base_dir, or inside a package."""
    if source.package is not None:
        spec = importlib.util.find_spec(source.package)
        if spec is None:
            raise FrontendError(f"Python package '{source.package}' is not installed")
        if spec.submodule_search_locations:
            root = Path(next(iter(spec.submodule_search_locations)))
        elif spec.origin:
            root = Path(spec.origin).parent
        else:
            raise FrontendError(f"Python package '{source.package}' has no directory on disk")
        where = f"package '{source.package}'"
    else:
        root = source.base_dir
        where = f"{source.base_dir}"
    directory = (root / source.ref) if source.ref not in ("", ".") else root
    if not directory.is_dir():
        raise FrontendError(
            f"Hugging Face model directory '{source.ref}' not found in {where} (looked for {directory})"
        )
    configs = [path for path in directory.rglob("config.json") if _is_hf_config(path)]
    if not configs:
        raise FrontendError(f"no Hugging Face config.json found under {directory}")
    shallowest = min(len(path.parts) for path in configs)
    candidates = sorted(path.parent for path in configs if len(path.parts) == shallowest)
    if len(candidates) > 1:
        listing = ", ".join(str(c.relative_to(directory)) for c in candidates)
        raise FrontendError(f"several models under {directory} ({listing}): name one in the plan")
    return candidates[0]


def _is_hf_config(path: Path) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and ("model_type" in data or "architectures" in data)


def _import_transformers() -> Any:
    """transformers, set up for offline loading without progress bars."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import transformers
    except ImportError as error:
        raise FrontendError("Hugging Face models need the 'transformers' package (pip install planc[hf])") from error
    transformers.utils.logging.disable_progress_bar()
    return transformers


def _hf_task(source: ModelSource, config: Any) -> Task:
    if source.task != "auto":
        return source.task
    architectures = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return "causal_lm"
    return "causal_lm" if getattr(config, "is_decoder", False) else "encoder"


def _read_hf_config(directory: Path) -> Any:
    transformers = _import_transformers()
    try:
        return transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
    except Exception as error:
        raise FrontendError(f"cannot read the Hugging Face config in {directory}: {error}") from error


def _hf_config_of(module: nn.Module) -> Any:
    """The Hugging Face config of a transformers model, None for any other module."""
    config = getattr(module, "config", None)
    return config if config is not None and hasattr(config, "model_type") else None


def _load_hf(source: ModelSource) -> tuple[nn.Module, Any, Path]:
    """Load a local Hugging Face directory: the base model for encoders, the LM head for decoders."""
    directory = _hf_model_dir(source)
    transformers = _import_transformers()
    config = _read_hf_config(directory)
    task = _hf_task(source, config)
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
            # A directory holding only config.json names an architecture: seeded random weights,
            # the same on every load (how plans describe models trained or benchmarked from scratch).
            logger.warning("%s has no weights: using a seeded random initialization", directory)
            with torch.random.fork_rng():
                torch.manual_seed(0)
                model = auto_class.from_config(config)
    except Exception as error:
        raise FrontendError(
            f"cannot load the Hugging Face model in {directory} as {auto_class.__name__}: "
            f"{type(error).__name__}: {error}"
        ) from error
    return model, config, directory


def _load_hf_tokenizer(directory: Path, source: ModelSource, max_positions: int | None) -> Tokenizer:
    if not any((directory / name).exists() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json")):
        logger.warning("%s has no tokenizer files: using byte-level ids 0..255", directory)
        return ByteTokenizer(source.inputs, max_positions)
    transformers = _import_transformers()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except Exception as error:
        raise FrontendError(
            f"cannot load the tokenizer files in {directory}: {type(error).__name__}: {error}"
        ) from error
    limits = [n for n in (tokenizer.model_max_length, max_positions) if n is not None and n < 1_000_000]
    return HFTokenizer(tokenizer, source.inputs, min(limits) if limits else None)


def _check_forward_accepts(model: nn.Module, source: ModelSource) -> None:
    """Every declared input is a named forward parameter, every required one is declared, and
    each can be produced from text."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError) as error:
        raise FrontendError(f"cannot inspect {type(model).__name__}.forward: {error}") from error
    named = [
        name
        for name, p in params.items()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    ]
    declared = [spec.name for spec in source.inputs]
    if not declared:
        raise FrontendError(f"model '{source.name}' declares no inputs")
    for spec in source.inputs:
        if spec.name not in named:
            hint = did_you_mean(spec.name, named)
            raise FrontendError(
                f"{type(model).__name__}.forward does not accept an input named '{spec.name}'"
                f" (it takes: {', '.join(named)})" + (f"; {hint[0]}" if hint else "")
            )
        if spec.name not in TOKEN_INPUTS:
            raise FrontendError(
                f"input '{spec.name}' cannot be produced from text; planc feeds models with "
                f"{', '.join(TOKEN_INPUTS)}"
            )
        if len(spec.dims) != 2:
            raise FrontendError(
                f"input '{spec.name}' must have two dims [batch, seq], got {len(spec.dims)}"
            )
    first = source.inputs[0]
    for spec in source.inputs[1:]:
        if spec.dims != first.dims:
            raise FrontendError(
                f"inputs '{first.name}' and '{spec.name}' come from the same tokens and need the same dims, "
                f"got [{', '.join(map(str, first.dims))}] and [{', '.join(map(str, spec.dims))}]"
            )
    missing = [
        name
        for name, p in params.items()
        if name in named and p.default is inspect.Parameter.empty and name not in declared
    ]
    if missing:
        raise FrontendError(
            f"{type(model).__name__}.forward requires {', '.join(repr(m) for m in missing)}, "
            "which the plan does not declare"
        )
    if "input_ids" not in declared:
        raise FrontendError("the plan must declare 'input_ids': planc feeds models with tokenized text")


def _input_embedding(model: nn.Module) -> nn.Embedding | None:
    getter = getattr(model, "get_input_embeddings", None)
    if callable(getter):
        try:
            found = getter()
        except Exception:  # some models raise NotImplementedError here
            found = None
        if isinstance(found, nn.Embedding):
            return found
    return next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)


def _check_byte_vocab(model: nn.Module, source: ModelSource) -> None:
    embedding = _input_embedding(model)
    if embedding is not None and embedding.num_embeddings < ByteTokenizer.vocab_size:
        raise FrontendError(
            f"factory models are fed UTF-8 bytes (ids 0..255), but '{source.name}' embeds only "
            f"{embedding.num_embeddings} token ids"
        )


def _max_positions(model: nn.Module, hf_config: Any) -> int | None:
    """The position table size: from the config, or the embedding named like positions."""
    for config in (hf_config, getattr(model, "config", None)):
        for attr in ("max_position_embeddings", "n_positions", "max_seq", "max_seq_len", "block_size"):
            value = getattr(config, attr, None) if config is not None else None
            if isinstance(value, int) and value > 0:
                return value
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and "pos" in name.rsplit(".", 1)[-1].lower():
            return module.num_embeddings
    return None


def _resolve_task(source: ModelSource, model: nn.Module, hf_config: Any, tokenizer: Tokenizer) -> Task:
    """`auto`: the HF architecture; for factories, vocabulary-sized last dim of the output = LM."""
    if hf_config is not None:
        return _hf_task(source, hf_config)
    if source.task != "auto":
        return source.task
    probe = _example_inputs(source, tokenizer, "encoder")
    with torch.no_grad():
        try:
            output = primary_output(model(**probe))
        except Exception as error:
            raise FrontendError(
                f"model '{source.name}' failed on example inputs: {type(error).__name__}: {error}"
            ) from error
    embedding = _input_embedding(model)
    vocab = embedding.num_embeddings if embedding is not None else tokenizer.vocab_size
    is_lm = output.dim() == 3 and output.shape[-1] == vocab and output.is_floating_point()
    return "causal_lm" if is_lm else "encoder"


def _example_inputs(source: ModelSource, tokenizer: Tokenizer, task: Task) -> dict[str, torch.Tensor]:
    """A padded batch of real text: prose for encoders, left-padded code for byte-level LMs."""
    dims = source.inputs[0].dims
    fixed_batch = dims[0] if isinstance(dims[0], int) else None
    fixed_seq = dims[1] if isinstance(dims[1], int) else None
    if task == "causal_lm" and isinstance(tokenizer, ByteTokenizer):
        pool = textdata.EXAMPLE_CODE
    else:
        pool = textdata.EXAMPLE_SENTENCES
    batch = fixed_batch if fixed_batch is not None else _EXAMPLE_BATCH
    texts = [pool[i % len(pool)] for i in range(batch)]
    inputs = tokenizer.encode_batch(texts, seq=fixed_seq, pad_left=task == "causal_lm")
    if fixed_batch is None and inputs["input_ids"].shape[1] == batch:
        # Equal example sizes would let torch.export conclude that batch == seq.
        texts.append(pool[batch % len(pool)])
        inputs = tokenizer.encode_batch(texts, seq=fixed_seq, pad_left=task == "causal_lm")
    return inputs


def _dynamic_shapes(inputs: tuple[InputSpec, ...], max_positions: int | None) -> dict[str, dict[int, Any] | None]:
    """`torch.export` dynamic shapes: one `Dim` per symbolic name, shared by every input using it.

    A name first seen on axis 0 is a batch dim (1..unbounded); on axis 1 a sequence dim
    (1..max positions).
    """
    dims: dict[str, Any] = {}
    shapes: dict[str, dict[int, Any] | None] = {}
    for spec in inputs:
        axes: dict[int, Any] = {}
        for axis, dim in enumerate(spec.dims):
            if isinstance(dim, int):
                continue
            if dim not in dims:
                if axis == 1 and max_positions is not None:
                    dims[dim] = torch.export.Dim(dim, min=1, max=max_positions)
                else:
                    dims[dim] = torch.export.Dim(dim, min=1)
            axes[axis] = dims[dim]
        shapes[spec.name] = axes or None
    return shapes


# ----------------------------------------------------------------------------- capture


def capture(loaded: LoadedModel) -> torch.fx.GraphModule:
    """The model as an fx graph with dynamic batch/seq, checked against eager.

    The graph owns a copy of the weights: rewriting it never changes `loaded.model`.

    `torch.export` first; if it fails, `torch.fx.symbolic_trace` with untraceable submodules
    kept as opaque leaves (listed in `gm.meta["planc_capture"]`, passes cannot see inside them).
    """
    try:
        # The graph gets its own weights: passes rewrite them in place, and `loaded.model` must
        # stay the untouched reference that verification compares against.
        model = copy.deepcopy(loaded.model)
    except Exception as error:
        raise FrontendError(
            f"cannot copy model '{loaded.source.name}' for capture: {type(error).__name__}: {error}"
        ) from error
    chatter = io.StringIO()
    try:
        with _quiet_export(chatter):
            exported = torch.export.export(
                model, (), kwargs=dict(loaded.example_inputs), dynamic_shapes=loaded.dynamic_shapes, strict=False
            )
        sys.stderr.write(chatter.getvalue())
        gm = exported.module()
        gm.meta["planc_capture"] = {"method": "export", "leaves": []}
    except Exception as export_error:
        export_summary = _first_line(export_error)
        logger.debug("torch.export error in full:\n%s\n%s", export_error, chatter.getvalue())
        logger.warning(
            "torch.export could not capture '%s' (%s); falling back to torch.fx.symbolic_trace",
            loaded.source.name,
            export_summary,
        )
        gm = _symbolic_capture(loaded, model, export_summary)
    _check_capture(loaded, gm)
    return gm


#: torch loggers that narrate a failed export (graph dumps, guard hints) at warning/error level.
_EXPORT_LOGGERS = ("torch.fx.experimental.symbolic_shapes", "torch.export", "torch._export")


@contextlib.contextmanager
def _quiet_export(chatter: io.StringIO) -> Iterator[None]:
    """Hold back what torch prints while trying an export (a failed one dumps the partial graph
    to stderr): a failure is reported once, by us, and the fallback may well succeed. The
    caller replays the text after a success."""
    loggers = [logging.getLogger(name) for name in _EXPORT_LOGGERS]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stderr(chatter):
            yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)


class _LeafTracer(torch.fx.Tracer):
    """A tracer that keeps the named submodules as opaque calls and remembers where it failed."""

    def __init__(self, leaves: set[str]) -> None:
        super().__init__()
        self.leaves = leaves
        #: Dotted path of the innermost module whose forward raised, "" for the root.
        self.failed_at: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.leaves or super().is_leaf_module(m, module_qualified_name)

    def call_module(
        self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_at is None:
                self.failed_at = self.path_of_module(m)
            raise


def _symbolic_capture(loaded: LoadedModel, model: nn.Module, export_summary: str) -> torch.fx.GraphModule:
    """symbolic_trace, making each submodule that fails an opaque leaf, until it traces or the
    failure reaches the model's own forward."""
    params = inspect.signature(model.forward).parameters
    concrete = {
        name: p.default
        for name, p in params.items()
        if name not in loaded.example_inputs and p.default is not inspect.Parameter.empty
    }
    classes = dict(module_table(model))
    leaves: set[str] = set()
    first_failure: tuple[str, BaseException] | None = None
    for _ in range(len(classes) + 1):
        tracer = _LeafTracer(set(leaves))
        try:
            graph = tracer.trace(model, concrete_args=concrete or None)
        except Exception as error:
            culprit = tracer.failed_at or ""
            if first_failure is None:
                first_failure = (culprit, error)
            if culprit and culprit not in leaves:
                logger.info("symbolic_trace failed inside '%s'; keeping it as an opaque leaf", culprit)
                leaves.add(culprit)
                continue
            where, cause = first_failure
            place = f"submodule '{where}' ({classes.get(where, '?')})" if where else f"{type(model).__name__}.forward"
            moved = "" if culprit == where else (
                f" (treating it as an opaque leaf moved the failure to {repr(culprit) if culprit else 'the model'})"
            )
            raise FrontendError(
                f"cannot capture model '{loaded.source.name}': torch.export failed ({export_summary}), and "
                f"torch.fx.symbolic_trace failed in {place}: {type(cause).__name__}: {_first_line(cause)}{moved}"
            ) from cause
        gm = torch.fx.GraphModule(tracer.root, graph, class_name=type(model).__name__)
        if leaves:
            logger.warning(
                "captured '%s' with torch.fx.symbolic_trace; opaque submodules (passes cannot see inside): %s",
                loaded.source.name,
                ", ".join(sorted(leaves)),
            )
        gm.meta["planc_capture"] = {
            "method": "symbolic_trace",
            "leaves": sorted(leaves),
            "export_error": export_summary,
        }
        return gm
    raise FrontendError(f"cannot capture model '{loaded.source.name}': symbolic_trace did not converge")


def _check_capture(loaded: LoadedModel, gm: torch.fx.GraphModule) -> None:
    """The graph computes what the eager model computes, on the example batch."""
    with torch.no_grad():
        try:
            got = gm(**loaded.example_inputs)
        except Exception as error:
            raise FrontendError(
                f"the captured graph of '{loaded.source.name}' fails on the example inputs: "
                f"{type(error).__name__}: {_first_line(error)}"
            ) from error
        want = loaded.model(**loaded.example_inputs)
    got_leaves = [t for t in pytree.tree_leaves(got) if isinstance(t, torch.Tensor)]
    want_leaves = [t for t in pytree.tree_leaves(want) if isinstance(t, torch.Tensor)]
    if len(got_leaves) != len(want_leaves):
        raise FrontendError(
            f"the captured graph of '{loaded.source.name}' returns {len(got_leaves)} tensors, "
            f"the model {len(want_leaves)}"
        )
    for a, b in zip(got_leaves, want_leaves):
        if a.shape != b.shape or not torch.allclose(a.float(), b.float(), rtol=_CAPTURE_RTOL, atol=_CAPTURE_ATOL):
            diff = (a.float() - b.float()).abs().max().item() if a.shape == b.shape else float("nan")
            raise FrontendError(
                f"the captured graph of '{loaded.source.name}' differs from the eager model "
                f"(shapes {tuple(a.shape)} vs {tuple(b.shape)}, max abs diff {diff:.3g})"
            )


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    first = text.splitlines()[0] if text else type(error).__name__
    return first[:300]


# ----------------------------------------------------------------------------- module table


def module_table(model: nn.Module) -> list[tuple[str, str]]:
    """(dotted path, class name) of every submodule, root excluded: what selectors match.

    For a graph from `torch.export` (whose submodules are plain containers) the original
    classes come from the nodes' `nn_module_stack` metadata.
    """
    if isinstance(model, torch.fx.GraphModule):
        from_meta = _module_table_from_meta(model)
        if from_meta:
            return from_meta
    return [(name, type(module).__name__) for name, module in model.named_modules() if name]


def _module_table_from_meta(gm: torch.fx.GraphModule) -> list[tuple[str, str]]:
    seen: dict[str, str] = {}
    for node in gm.graph.nodes:
        for path, kind in (node.meta.get("nn_module_stack") or {}).values():
            # torch.export tags nodes it cannot place with a sentinel entry: not a module.
            if path and path not in seen and not path.startswith("_empty_nn_module_stack"):
                name = kind.__name__ if isinstance(kind, type) else str(kind).rsplit(".", 1)[-1]
                seen[path] = name
    return list(seen.items())


# ----------------------------------------------------------------------------- samples and outputs


def load_samples(
    loaded: LoadedModel, path: str | Path, count: int | None, seq: int | None = None
) -> list[dict[str, torch.Tensor]]:
    """Up to `count` (None: all) samples from a text file (one per non-blank line), each a batch of one.

    A relative `path` resolves against the plan's directory. With `seq`, every sample is padded
    (left for decoders) or truncated to exactly `seq` tokens.
    """
    file = Path(path)
    if not file.is_absolute():
        file = loaded.source.base_dir / file
    if not file.is_file():
        raise FrontendError(f"sample file '{path}' not found (looked for {file})")
    try:
        lines = [line.strip() for line in file.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as error:
        raise FrontendError(f"cannot read sample file '{path}': {error}") from error
    texts = [line for line in lines if line][:count]
    if not texts:
        raise FrontendError(f"sample file '{path}' has no non-blank lines")
    if count is not None and len(texts) < count:
        logger.warning("sample file '%s' has %d samples, %d were asked for", path, len(texts), count)
    pad_left = loaded.task == "causal_lm"
    return [loaded.tokenizer.encode_batch([text], seq=seq, pad_left=pad_left) for text in texts]


def primary_output(outputs: Any) -> torch.Tensor:
    """The main tensor of a model's outputs: logits, else last hidden state, else the first tensor."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, dict) or hasattr(outputs, "keys"):
        for key in ("logits", "last_hidden_state"):
            value = outputs.get(key) if hasattr(outputs, "get") else None
            if isinstance(value, torch.Tensor):
                return value
        values = list(outputs.values())
    elif isinstance(outputs, (tuple, list)):
        values = list(outputs)
    else:
        raise FrontendError(f"model output of type {type(outputs).__name__} holds no tensor")
    for value in values:
        try:
            return primary_output(value)
        except FrontendError:
            continue
    raise FrontendError(f"model output of type {type(outputs).__name__} holds no tensor")


def embed(outputs: Any, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sentence embeddings: hidden states mean-pooled over real tokens, L2-normalized [batch, hidden]."""
    hidden = primary_output(outputs).float()
    if hidden.dim() == 2:
        return F.normalize(hidden, p=2, dim=-1)
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    return F.normalize(pooled, p=2, dim=-1)


def model_output(loaded: LoadedModel, module: Callable[..., Any], inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """What verification compares, for the eager model or any graph of it: embeddings for
    encoders, logits for causal LMs (fp32)."""
    with torch.no_grad():
        outputs = module(**inputs)
    if loaded.task == "causal_lm":
        return primary_output(outputs).float()
    mask = inputs.get("attention_mask")
    if mask is None:
        mask = torch.ones(inputs["input_ids"].shape[:2], dtype=torch.int64)
    return embed(outputs, mask)
