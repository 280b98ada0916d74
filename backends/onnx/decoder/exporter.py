"""Export a decoder LM with a key/value cache as one ONNX graph that serves prefill and decode.

The graph follows Optimum's `ORTModelForCausalLM` naming, so other runtimes can load it too:

- inputs  `input_ids` [batch, seq] int64, `attention_mask` [batch, past + seq] int64,
  `position_ids` [batch, seq] int64, `past_key_values.{i}.key` / `.value`
  [batch, kv_heads, past, head_dim] float32 (past may be 0: that call is the prefill);
- outputs `logits` [batch, seq, vocab], `present.{i}.key` / `.value` [batch, kv_heads, past + seq,
  head_dim].

Where the serving rewrites apply (`serving.py`, checked by `fusions.py`), the
graph also takes `logits_to_keep`, which every caller feeds (`serving.logits_to_keep_feed`),
and lets one max-length buffer serve as past and present (`DecoderSpec.kv_buffer`, the README's
"Decoder graphs" section).

Two model families are adapted to that signature by a wrapper that flattens the cache:
the example GPT (`examples/models/gpt.py`: a list of (k, v) tuples) and Hugging Face causal LMs
(GPT-2, Llama, ...: a `DynamicCache` built from the flat tensors and read back per layer).
The artifact directory holds `model.onnx`, `decoder.json` (a `DecoderSpec`) and the tokenizer.
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from planc.backends.onnx.decoder.cache_adapter import (
    CacheAdapter,
    UnsupportedDecoder,
    adapt,
    empty_past,
    has_linear_projections,
    is_hf_model,
    position_ids_from_mask,
)
from planc.backends.onnx.decoder.fusions import fuse_if_exact, optimized
from planc.backends.onnx.decoder.serving import LOGITS_TO_KEEP, add_logits_to_keep
from planc.backends.onnx.decoder.tokenizer import HF_TOKENIZER_FILES
from planc.backends.onnx.export import save_model
from planc.compiler.model.deferred import deferred_loaders, has_deferred_weights
from planc.passes.graph_utils import DEFERRED_WEIGHTS, conv1d_as_linear
from planc.passes.quantize import Quantize

logger = logging.getLogger(__name__)

SPEC_FILE = "decoder.json"
MODEL_FILE = "model.onnx"

Quantization = Literal["int8", "int4"]


def input_names(n_layer: int, logits_to_keep: bool = False) -> list[str]:
    """The graph's inputs in order; `logits_to_keep` comes last where the serving rewrite added it."""
    names = ["input_ids", "attention_mask", "position_ids"]
    for i in range(n_layer):
        names += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
    return names + [LOGITS_TO_KEEP] * logits_to_keep


def output_names(n_layer: int) -> list[str]:
    names = ["logits"]
    for i in range(n_layer):
        names += [f"present.{i}.key", f"present.{i}.value"]
    return names


@dataclass
class DecoderSpec:
    """What a runtime needs to drive the graph: `decoder.json` of an artifact."""

    family: str  #: "gpt" (the example GPT) or the HF `model_type` ("gpt2", "llama", ...)
    n_layer: int
    n_head: int  #: key/value heads (the widest layer, when pruning left layers uneven)
    head_dim: int
    vocab: int
    kv_heads: list[int]  #: key/value heads of each layer
    max_positions: int | None
    eos_token_ids: list[int]
    pad_token_id: int
    tokenizer: dict[str, Any]  #: {"kind": "bytes"} or {"kind": "hf", "path": "tokenizer.json"}
    quantization: str | None = None
    quantizer: str | None = None  #: "planc" or "ort": who wrote the integer weights
    group_size: int | None = None
    fusions: dict[str, int] = field(default_factory=dict)
    #: "shared": one max-length buffer per key/value may be bound as both past and present
    #: (README, "Decoder graphs"); "growing": presents are new tensors of past + seq slots.
    kv_buffer: str = "growing"
    #: The graph has the `logits_to_keep` input (0: logits of every position; callers must feed it).
    logits_to_keep: bool = False
    #: The embedding table that reads the int4 LM head's weights (`tied_embedding.py`), if any.
    tied_embedding: str | None = None

    @property
    def eos_token_id(self) -> int | None:
        return self.eos_token_ids[0] if self.eos_token_ids else None

    def to_json(self) -> str:
        data = asdict(self)
        data["eos_token_id"] = self.eos_token_id
        data["inputs"] = input_names(self.n_layer, self.logits_to_keep)
        data["outputs"] = output_names(self.n_layer)
        return json.dumps(data, indent=2) + "\n"

    @classmethod
    def load(cls, artifact_dir: str | Path) -> DecoderSpec:
        path = Path(artifact_dir) / SPEC_FILE
        if not path.exists():
            raise FileNotFoundError(f"{artifact_dir} is not a decoder artifact: {SPEC_FILE} is missing")
        data = json.loads(path.read_text())
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


# ----------------------------------------------------------------------------- models


def load_hf_decoder(path: str | Path) -> nn.Module:
    """A causal LM from a `save_pretrained` directory (the model source's loader, see there)."""
    from planc.compiler.model import load_hf_directory

    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face model directory")
    return load_hf_directory(path, "causal_lm")


def _export_inputs(adapter: CacheAdapter) -> dict[str, Any]:
    """Realistic example inputs by name: real ids, left padding in one row, a non-empty past.

    Graphs are captured with keyword inputs, so passes can run them as `gm(**sample)`."""
    gen = torch.Generator().manual_seed(0)
    batch, past_len, seq = 2, 3, 5
    vocab = adapter.vocab_size()
    ids = torch.randint(1, vocab, (batch, seq), generator=gen)
    mask = torch.ones(batch, past_len + seq, dtype=torch.int64)
    mask[1, :2] = 0
    positions = position_ids_from_mask(mask)[:, past_len:]
    past = empty_past(adapter.cache_layout(), batch, past_len, gen)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "past": past}


def decoder_inputs(adapter: CacheAdapter, sample: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A tokenized text (`input_ids`, `attention_mask`) as a prefill of the cache graph: no past."""
    ids = sample["input_ids"]
    mask = sample.get("attention_mask", torch.ones_like(ids))
    return {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids_from_mask(mask),
            "past": empty_past(adapter.cache_layout(), ids.shape[0])}


# ----------------------------------------------------------------------------- export


def _dynamic_shapes(n_layer: int) -> dict:
    batch = torch.export.Dim("batch_size")
    seq = torch.export.Dim("sequence_length")
    past = torch.export.Dim("past_sequence_length", min=0)
    return {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: torch.export.Dim("total_sequence_length")},
        "position_ids": {0: batch, 1: seq},
        "past": [({0: batch, 2: past}, {0: batch, 2: past}) for _ in range(n_layer)],
    }


def capture_decoder(model: nn.Module) -> torch.fx.GraphModule:
    """The flat-cache decoder as an fx.GraphModule (`torch.export`), for planc's graph passes.

    Module paths inside it are the model's own prefixed with `model.` (see `graph_targets`).
    Export the transformed graph with `export_decoder(model, out, graph=gm)`.
    """
    adapter = adapt(model.eval())
    # backed_size_oblivious: no guards that a size is (not) 0/1, as torch.onnx.export captures
    try:
        with torch.no_grad(), torch.fx.experimental._config.patch(backed_size_oblivious=True):
            program = torch.export.export(
                adapter,
                (),
                kwargs=_export_inputs(adapter),
                dynamic_shapes=_dynamic_shapes(len(adapter.cache_layout())),
                strict=False,
            )
    except Exception as error:  # noqa: BLE001 - torch.export raises many kinds; all mean "not capturable"
        first = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise UnsupportedDecoder(f"torch.export cannot capture {type(model).__name__} with a dynamic sequence: {first}") from error
    finally:
        forget_export_trace()
    gm = program.module()
    gm.meta[DEFERRED_WEIGHTS] = deferred_loaders(model, "model.")  # the adapter holds the model as `model`
    conv1d_as_linear(gm)  # GPT-2's projections become Linears for planc's passes
    return gm


def forget_export_trace() -> None:
    """Let go of torch.export's last trace. torch keeps its nodes in a module-level map until the
    next export (`proxy_tensor._FAKE_TENSOR_ID_TO_PROXY_MAP_FOR_EXPORT`), and their fake tensors
    hold the real constants they were made from: the quantized weights, gigabytes at scale."""
    from torch.fx.experimental import proxy_tensor

    getattr(proxy_tensor, "_FAKE_TENSOR_ID_TO_PROXY_MAP_FOR_EXPORT", {}).clear()


def graph_targets(targets: set[str] | frozenset[str]) -> frozenset[str]:
    """Selector targets (paths in the eager model) as paths in a `capture_decoder` graph."""
    return frozenset("model" if t == "" else f"model.{t}" for t in targets)


def export_onnx(adapter: CacheAdapter, opset: int = 18, graph: torch.fx.GraphModule | None = None,
                optimize: bool = True):
    """torch.onnx.export(dynamo=True) of the adapter (or of its captured, transformed `graph`):
    an `onnx_ir.Model` with dynamic axes; planc's quantized ops are lowered on the way.
    `optimize=False` leaves onnxscript's optimizer to the caller (the ORT fusions run it first:
    running it twice costs a real-sized graph seconds)."""
    from planc.backends.onnx.lowering import translation_table

    n_layer = len(adapter.cache_layout())
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # axis-renaming and pytree deprecation notes of the exporter
            program = torch.onnx.export(
                adapter.eval() if graph is None else graph,
                (),
                kwargs=_export_inputs(adapter),
                dynamo=True,
                dynamic_shapes=_dynamic_shapes(n_layer),
                input_names=input_names(n_layer),
                output_names=output_names(n_layer),
                opset_version=opset,
                custom_translation_table=translation_table(),
                optimize=optimize,
                verbose=False,
            )
    except torch.onnx.errors.OnnxExporterError as error:
        first = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise UnsupportedDecoder(f"the ONNX exporter cannot export {adapter.family} with a key/value cache: {first}") from error
    finally:
        forget_export_trace()
    model = program.model
    _name_total_length(model)
    return model


def quantize_with_planc(
    model: nn.Module,
    options: Quantize | Quantization,
    cpu: str = "auto",
    load_samples: Callable[[str, int], list[dict[str, torch.Tensor]]] | None = None,
) -> torch.fx.GraphModule:
    """The decoder's cache graph with every Linear rewritten by the plan's quantize step.

    The step runs through planc's registry and pass manager like any other, with all of its
    options (method, smoothing, calibration); `load_samples(path, count)` gives tokenized texts
    for calibration, fed to the graph as prefills.
    """
    from planc.passes.base import PassContext, PassError
    from planc.passes.graph_utils import linear_sites
    from planc.passes.manager import PassManager
    from planc.passes.registry import load_pass

    if isinstance(options, str):
        options = Quantize(scheme=options)
    gm = capture_decoder(model)
    targets = frozenset(site.module_path for site in linear_sites(gm))
    if not targets:
        raise ValueError(
            f"planc's quantize pass finds no Linear in {type(model).__name__} "
            "(nor a GPT-2 Conv1D): use quantizer='ort'"
        )
    adapter = adapt(model)
    ctx = PassContext(
        model=model,
        example_inputs=_export_inputs(adapter),
        targets=targets,
        source="decoder export",
        cpu=cpu,
        load_samples=None if load_samples is None else lambda path, count: [decoder_inputs(adapter, s) for s in load_samples(path, count)],
    )
    try:
        # The captured graph is this call's own; a streamed model's (whose passes read each
        # weight once and edit none in place) is not copied: that would copy its embeddings.
        graph, records = PassManager(copy=not has_deferred_weights(model)).run(gm, [(load_pass(options), ctx)])
    except PassError as error:
        raise UnsupportedDecoder(f"planc's quantize step cannot rewrite {type(model).__name__}: {error.message}") from error
    logger.info("planc quantize: %s", records[-1].summary)
    return graph


def _name_total_length(model) -> None:
    """Give the past + seq axis (mask and presents) one readable name."""
    import onnx_ir as ir

    total = ir.SymbolicDim("total_sequence_length")
    for value in list(model.graph.inputs) + list(model.graph.outputs):
        if value.name == "attention_mask" or value.name.startswith("present."):
            dims = list(value.shape)
            axis = 1 if value.name == "attention_mask" else 2
            dims[axis] = total
            value.shape = ir.Shape(dims)


def bind_deferred_weights(model, loaders: dict[str, Callable[[], torch.Tensor]]) -> int:
    """Give each initializer exported from a deferred weight's never-written storage
    (`compiler/model/deferred.py`) the checkpoint's values, read when the file is written
    (onnx_ir's `LazyTensor`): the weights pass from the checkpoint to the artifact one at a
    time. Returns how many were bound."""
    import onnx_ir as ir

    def lazy(load: Callable[[], torch.Tensor], shape: ir.Shape) -> ir.LazyTensor:
        return ir.LazyTensor(lambda: ir.Tensor(load().numpy()), dtype=ir.DataType.FLOAT, shape=shape)

    bound = 0
    for name, load in loaders.items():
        value = model.graph.initializers.get(name)
        if value is not None:
            value.const_value = lazy(load, value.shape)
            bound += 1
    if bound:
        logger.info("%d deferred weights bound to the checkpoint: written to the artifact one at a time", bound)
    return bound


def store_transposed(model) -> int:
    """Store each 2-D initializer the graph transposes (a Linear's `x @ W.T`) transposed, in a
    `LazyTensor` computed when the file is written, as the optimizer's constant folding would
    store it in memory: a real-sized model's weights are never all held. The original stays
    where something else reads it (a tied embedding's Gather). Returns how many."""
    import onnx_ir as ir

    count = 0
    for name, value in list(model.graph.initializers.items()):
        source = value.const_value
        if source is None or len(value.shape) != 2:
            continue
        transposes = [node for node, _ in value.uses() if node.op_type == "Transpose"
                      and (node.attributes.get("perm") is None or list(node.attributes["perm"].as_ints()) == [1, 0])]
        if not transposes:
            continue
        shape = ir.Shape(list(value.shape)[::-1])
        stored = ir.Value(name=f"{name}.T", shape=shape, type=ir.TensorType(source.dtype),
                          const_value=ir.LazyTensor(lambda source=source: ir.Tensor(source.numpy().T.copy()),
                                                    dtype=source.dtype, shape=shape))
        model.graph.register_initializer(stored)
        for node in transposes:
            node.outputs[0].replace_all_uses_with(stored)
            model.graph.remove(node, safe=True)
        if not value.uses():
            model.graph.initializers.pop(name)
        count += 1
    return count


def _with_weights_as_matmul(model):
    """The graph with its weight products as plain MatMuls (`weights_as_matmul`); the same
    graph, not a copy, when it has none to rewrite (a copy of a real-sized model costs GBs)."""
    import onnx_ir as ir

    from planc.backends.onnx.decoder.quantize import weights_as_matmul

    def rewritable(node) -> bool:
        weight = node.inputs[0] if node.op_type == "Transpose" else (node.inputs[1] if len(node.inputs) > 1 else None)
        return node.op_type in ("Gemm", "FusedMatMul", "Transpose") and weight is not None and weight.is_initializer()

    if not any(rewritable(node) for node in model.graph):
        return model
    proto = ir.serde.serialize_model(model)
    count = weights_as_matmul(proto)
    logger.debug("%d weight products rewritten as MatMul", count)
    return ir.serde.deserialize_model(proto)


def _find_tokenizer(model: nn.Module, adapter: CacheAdapter, tokenizer: str | Path | None) -> Path | None:
    """The directory of the tokenizer files to ship, or None for byte-level text."""
    if tokenizer is None and is_hf_model(model):
        source = Path(getattr(model, "name_or_path", "") or "")
        if (source / "tokenizer.json").exists():
            return source
    if tokenizer is None or str(tokenizer) == "bytes":
        if adapter.vocab_size() < 256:
            raise ValueError(
                f"vocabulary of {adapter.vocab_size()} is too small for byte-level text: "
                "pass the model's tokenizer (a directory with tokenizer.json)"
            )
        return None
    source = Path(tokenizer)
    directory = source.parent if source.is_file() else source
    if not (directory / "tokenizer.json").exists():
        raise FileNotFoundError(f"no tokenizer.json in {directory}: decoder artifacts need a fast tokenizer file")
    return directory


def _copy_tokenizer(directory: Path | None, out: Path) -> dict:
    """Copy the tokenizer files into `out`; returns decoder.json's `tokenizer` entry."""
    if directory is None:
        return {"kind": "bytes"}
    for name in HF_TOKENIZER_FILES:
        if (directory / name).exists():
            shutil.copyfile(directory / name, out / name)
    return {"kind": "hf", "path": "tokenizer.json"}


def _special_ids(model: nn.Module, vocab: int, eos: int | list[int] | None, pad: int | None):
    """(eos ids, pad id) from the arguments or the HF config, ids outside the vocabulary dropped."""
    if eos is None and is_hf_model(model):
        eos = model.config.eos_token_id
    if pad is None and is_hf_model(model):
        pad = model.config.pad_token_id
    eos_ids = [e for e in ([eos] if isinstance(eos, int) else list(eos or [])) if 0 <= e < vocab]
    if pad is None or not 0 <= pad < vocab:
        pad = eos_ids[0] if eos_ids else 0
    return eos_ids, int(pad)


def export_decoder(
    model: nn.Module | str | Path,
    out_dir: str | Path,
    *,
    quantize: Quantize | Quantization | None = None,
    group_size: int = 32,
    quantizer: Literal["auto", "planc", "ort"] = "auto",
    fusions: bool = True,
    opset: int = 18,
    tokenizer: str | Path | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    graph: torch.fx.GraphModule | None = None,
    load_samples: Callable[[str, int], list[dict[str, torch.Tensor]]] | None = None,
    cpu: str = "auto",
    int4_compute: Literal["fp32", "int8"] | None = None,
) -> DecoderSpec:
    """Write a decoder artifact (`model.onnx`, `decoder.json`, tokenizer files) as `out_dir`, atomically.

    `model` is an nn.Module (example GPT or HF causal LM) or a HF `save_pretrained` directory.
    `quantize` = "int8" stores per-channel int8 weights with dynamically quantized activations;
    "int4" stores 4-bit weights in blocks of `group_size` (MatMulNBits); a plan's `Quantize`
    options bring their method, smoothing and calibration (`load_samples(path, count)` reads
    its texts). `quantizer` picks who
    quantizes: "planc" (the quantize pass on the captured graph, lowered by `lowering.py` and
    `optimize.py`), "ort" (ONNX Runtime's tools on the exported graph), "auto" (planc when the
    model's projections are Linears or GPT-2 Conv1Ds and torch.export captures it, else ort). `graph` is a `capture_decoder`
    graph already transformed by planc passes (then `quantize` must be None). `tokenizer` is a
    directory holding tokenizer.json, "bytes", or None (the HF model's own directory, else bytes).
    `cpu` is the target CPU of int8 weights (`passes/cpu.py`: 7-bit where its sums saturate).
    `int4_compute` sets how ONNX Runtime multiplies int4 weights (`int4_compute.py`; None: as
    the quantizer left them).
    """
    if not isinstance(model, nn.Module):
        model = load_hf_decoder(model)
    model = model.eval()
    adapter = adapt(model)
    layout = adapter.cache_layout()
    tokenizer_dir = _find_tokenizer(model, adapter, tokenizer)
    eos_ids, pad = _special_ids(model, adapter.vocab_size(), eos_token_id, pad_token_id)
    out = Path(out_dir)

    if isinstance(quantize, str):
        quantize = Quantize(scheme=quantize, group_size=group_size) if quantize == "int4" else Quantize(scheme=quantize)
    scheme = quantize.scheme if quantize is not None else None
    group_size = quantize.group_size if quantize is not None else group_size
    if graph is not None and quantize is not None:
        raise ValueError("export_decoder(graph=...) takes an already transformed graph: quantize it with planc's pass, not here")
    chosen_automatically = quantizer == "auto"
    if quantize is not None and quantizer == "auto":
        quantizer = "planc" if has_linear_projections(model) else "ort"
    if quantize is not None and quantizer == "planc":
        try:
            graph = quantize_with_planc(model, quantize, cpu, load_samples)
        except UnsupportedDecoder as error:
            if not chosen_automatically:
                raise
            # e.g. BLOOM and Falcon branch on "one new token" in Python: torch.export cannot keep
            # the sequence dynamic there, while the ONNX exporter's own trace can.
            logger.warning("%s; quantizing with ONNX Runtime's quantizer after export instead", error)
            quantizer = "ort"
    # Unoptimized: the optimizer's constant folding must not read a deferred weight's empty
    # storage before `bind_deferred_weights` gives it the checkpoint's bytes.
    onnx_model = export_onnx(adapter, opset, graph, optimize=False)
    # The adapter holds the model as `model`; a captured graph carries its own loaders.
    bind_deferred_weights(onnx_model, deferred_loaders(model, "model.") if graph is None else graph.meta.get(DEFERRED_WEIGHTS, {}))
    transformed = graph is not None
    # Exported: the initializers hold what the graph's weights were. Let the graph go, so that
    # the weights the serving rewrites merge (q/k/v, gate/up) are not kept twice (gigabytes at 8B).
    del graph
    store_transposed(onnx_model)
    # Plain MatMuls first: quantizers need them, and onnxscript's MHA fusion drops the Reshape
    # that feeds a 2-D Gemm (GPT-2's Conv1D), which leaves the Gemm a 3-D input.
    onnx_model = _with_weights_as_matmul(onnx_model)
    fused = fuse_if_exact(onnx_model, adapter) if fusions else optimized(onnx_model)
    onnx_model = fused.model
    if transformed:
        from planc.backends.onnx.optimize import lower_int8

        lowered = lower_int8(onnx_model)  # planc int8 weights -> DynamicQuantizeMatMul
        logger.info("planc int8 weights lowered to ORT kernels: %s", lowered or "none")
    tied = None
    if transformed and scheme == "int4":
        from planc.backends.onnx.tied_embedding import share_tied_embedding

        tied = share_tied_embedding(onnx_model)  # one int4 table for a tied embedding and LM head
    keeps_logits = add_logits_to_keep(onnx_model)
    if int4_compute is not None:
        from planc.backends.onnx.int4_compute import set_levels

        set_levels(onnx_model, int4_compute)
    from planc.compiler.publish import staged_dir

    with staged_dir(out) as tmp:
        path = Path(tmp) / MODEL_FILE
        save_model(onnx_model, path)
        # The exporter's graph lives on in references torch and onnx_ir keep after the export;
        # its initializers must not hold the weights (at 8B, gigabytes) once they are written.
        for value in onnx_model.graph.initializers.values():
            value.const_value = None

        if quantize is not None and quantizer == "ort":
            from planc.backends.onnx.decoder.quantize import quantize_decoder

            quantize_decoder(path, path, scheme, group_size=group_size, cpu=cpu)
            if int4_compute is not None:
                from planc.backends.onnx.int4_compute import set_compute

                set_compute(path, int4_compute)
        tok_entry = _copy_tokenizer(tokenizer_dir, Path(tmp))
        spec = DecoderSpec(
            family=adapter.family,
            n_layer=len(layout),
            n_head=max(h for h, _ in layout),
            head_dim=layout[0][1],
            vocab=adapter.vocab_size(),
            kv_heads=[h for h, _ in layout],
            max_positions=adapter.max_positions(),
            eos_token_ids=eos_ids,
            pad_token_id=pad,
            tokenizer=tok_entry,
            quantization=scheme,
            quantizer=quantizer if quantize is not None else None,
            group_size=group_size if scheme == "int4" else None,
            fusions=fused.applied,
            kv_buffer="shared" if fused.shared_buffer else "growing",
            logits_to_keep=keeps_logits,
            tied_embedding=tied,
        )
        (Path(tmp) / SPEC_FILE).write_text(spec.to_json())
    logger.info("decoder artifact written to %s (%s)", out, scheme or "fp32")
    return spec
