"""Load a plan's model: a factory (file or importable module) or a Hugging Face directory, offline.

Resolves the task (`encoder` or `causal_lm`), checks that `forward` accepts every declared
input, builds the tokenizer and a realistic, padded example batch, and maps symbolic dims to
`torch.export.Dim`s.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx
from torch import nn

from planc.compiler import textdata
from planc.compiler.ir import InputSpec, ModelSource
from planc.dsl.source import did_you_mean

logger = logging.getLogger(__name__)


from planc.compiler.model.common import TOKEN_INPUTS, FrontendError, Task, logger, primary_output
from planc.compiler.model_source import (
    ModelSourceError,
    call_factory,
    declared_task,
    hf_source_directory,
    hf_task,
    import_factory,
    import_transformers,
    load_hf,
    load_tokenizer,
    spec_of,
)
from planc.compiler.model.tokenizers import ByteTokenizer, HFTokenizer, Tokenizer

#: Number of texts in the example batch (more when it would equal the sequence length, which
#: would make torch.export unify the two dims).
_EXAMPLE_BATCH = 4

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
    #: What the plan's architecture rewrites (`share`) did to the model, for reports.
    rewrites: list[dict[str, Any]] = field(default_factory=list)


def load_model(source: ModelSource, module: nn.Module | None = None, defer_linear_weights: bool = False) -> LoadedModel:
    """Build the eager model (fp32, eval, CPU), its tokenizer and example inputs for `source`.

    `module` (from the Python API) replaces the plan's factory or weights; it is put in eval
    mode on CPU in fp32 in place. An `hf` source still provides its tokenizer files.
    `defer_linear_weights`: a safetensors checkpoint's Linear weights are read where used
    (`deferred.py`), for builds that read each of them once.
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
        model, hf_config, hf_dir = _load_hf(source, defer_linear_weights)
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
    module, origin = _located(import_factory, target, source.base_dir)
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
        model = call_factory(factory, source.args)
    except Exception as error:  # the factory is user code: any failure is reported, not raised raw
        raise FrontendError(
            f"factory '{source.ref}' raised {type(error).__name__}: {error}"
        ) from error
    if not isinstance(model, nn.Module):
        raise FrontendError(
            f"factory '{source.ref}' returned a {type(model).__name__}, not a torch.nn.Module"
        )
    return model, f"{origin}:{func_name}"


def _located(function: Any, *args: Any) -> Any:
    """`function(*args)` of the shared model source, its errors as the front end's."""
    try:
        return function(*args)
    except ModelSourceError as error:
        raise FrontendError(str(error)) from error


def _hf_model_dir(source: ModelSource) -> Path:
    """The directory holding the model's `config.json`: under base_dir, or inside a package."""
    return _located(hf_source_directory, source)


def _hf_task(source: ModelSource, config: Any) -> Task:
    if source.task != "auto":
        return source.task
    return hf_task(getattr(config, "architectures", None), bool(getattr(config, "is_decoder", False)))


def _read_hf_config(directory: Path) -> Any:
    transformers = _located(import_transformers)
    try:
        return transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
    except Exception as error:
        raise FrontendError(f"cannot read the Hugging Face config in {directory}: {error}") from error


def _hf_config_of(module: nn.Module) -> Any:
    """The Hugging Face config of a transformers model, None for any other module."""
    config = getattr(module, "config", None)
    return config if config is not None and hasattr(config, "model_type") else None


def _load_hf(source: ModelSource, defer_linear_weights: bool = False) -> tuple[nn.Module, Any, Path]:
    """Load a local Hugging Face directory: the base model for encoders, the LM head for decoders."""
    directory = _hf_model_dir(source)
    config = _read_hf_config(directory)
    task = _hf_task(source, config)
    if defer_linear_weights and task == "causal_lm" and any(directory.glob("*.safetensors")):
        from planc.compiler.model.deferred import CheckpointUnreadable, load_deferred

        transformers = _located(import_transformers)
        config.use_cache = False
        try:
            return load_deferred(directory, transformers.AutoModelForCausalLM, config), config, directory
        except CheckpointUnreadable as error:
            logger.info("loading every weight of %s: %s", directory, error)
        except Exception as error:  # transformers raises many kinds; each means "cannot build it"
            raise FrontendError(f"cannot load the Hugging Face model in {directory}: {type(error).__name__}: {error}") from error
    model = load_hf_directory(directory, task, config)
    return model, config, directory


def load_hf_directory(directory: Path, task: Task, config: Any = None) -> nn.Module:
    """The model in a `save_pretrained` directory, offline (see `source.load_hf`); a directory
    holding only `config.json` gets seeded random weights, with a warning."""
    config = config if config is not None else _read_hf_config(directory)
    if not any(directory.glob("*.safetensors")) and not any(directory.glob("pytorch_model*.bin")):
        logger.warning("%s has no weights: using a seeded random initialization", directory)
    return _located(load_hf, directory, task, config)


def _load_hf_tokenizer(directory: Path, source: ModelSource, max_positions: int | None) -> Tokenizer:
    tokenizer = _located(load_tokenizer, directory)
    if tokenizer is None:
        logger.warning("%s has no tokenizer files: using byte-level ids 0..255", directory)
        return ByteTokenizer(source.inputs, max_positions)
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





def model_task(source: ModelSource) -> Task:
    """The plan's task without capturing: declared, read from an HF config, or (a factory with
    `task = auto`) decided by `load_model`'s probe of the model's output."""
    return _located(declared_task, source) or load_model(source).task


def model_spec(source: ModelSource, task: Task) -> dict[str, Any]:
    """The spec (`compiler/model_source.py`) another process rebuilds this model from."""
    return _located(spec_of, source, task)
