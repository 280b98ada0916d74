"""Drivers for decoder graphs of any origin, so that planc's and ONNX Runtime GenAI's artifacts
are scored and timed by the same code (`bench/bench_builder.py`).

- `GraphLoop`: greedy generation through I/O binding from the graph's declared inputs alone
  (Optimum/GenAI names: `input_ids`, `attention_mask`, `position_ids` when the graph takes it,
  `past_key_values.{i}.key/value` -> `present.{i}.key/value`). With `shared=True` it binds one
  max-length buffer per key/value as both past and present, as each tool's own runtime does for
  graphs that declare it (planc: decoder.json `kv_buffer: shared`; the builder:
  genai_config.json `past_present_share_buffer`). A graph with `logits_to_keep` is asked for
  the last position's logits in the prefill and for every position elsewhere (planc's
  `logits_to_keep_feed`: the input has no default). Prompts have equal lengths (no padding: the
  builder's graphs support right padding only, planc's left padding only).
- `score`: logits at every position of some windows in one cache-less call, for top-1
  agreement and perplexity.
- `genai_generate`: the builder's own runtime (`og.Generator`) on the same prompts.

Every ONNX Runtime session here uses the given thread count and `session.intra_op.allow_spinning
= 0`; `og.Generator`'s session gets the thread count (its config has no way to set spinning).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from planc.backends.onnx.decoder.serving import logits_to_keep_feed


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@dataclass
class Layout:
    """The cache a graph expects: layers, key/value heads, head size."""

    layers: int
    kv_heads: int
    head_dim: int


class GraphLoop:
    """Greedy generation on one decoder graph (see the module docstring)."""

    def __init__(self, path: Path, layout: Layout, threads: int, shared: bool) -> None:
        self.session = session(path, threads)
        self.layout = layout
        self.shared = shared
        self.inputs = {i.name for i in self.session.get_inputs()}
        # held for the session's life: a bound input may keep referring to its array
        self.keep_every, self.keep_last = logits_to_keep_feed(self.inputs), logits_to_keep_feed(self.inputs, last=1)
        self.binding = self.session.io_binding()

    def _cache(self, batch: int, slots: int) -> list[ort.OrtValue]:
        shape = (batch, self.layout.kv_heads, slots, self.layout.head_dim)
        return [ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, np.float32)) for _ in range(2 * self.layout.layers)]

    def _names(self, prefix: str) -> list[str]:
        return [f"{prefix}.{i}.{kind}" for i in range(self.layout.layers) for kind in ("key", "value")]

    def generate(self, prompts: np.ndarray, new_tokens: int) -> np.ndarray:
        """[batch, new_tokens] greedy ids after `prompts` [batch, prompt_len]."""
        batch, length = prompts.shape
        mask = np.ones((batch, length + new_tokens), np.int64)
        positions = np.arange(length + new_tokens, dtype=np.int64)[None].repeat(batch, 0)
        feeds = {"input_ids": prompts.astype(np.int64), "attention_mask": mask[:, :length], **self.keep_last}
        if "position_ids" in self.inputs:
            feeds["position_ids"] = positions[:, :length]
        values = {k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()}
        past = self._cache(batch, length + new_tokens if self.shared else 0)
        values.update(zip(self._names("past_key_values"), past))
        outputs = self.session.run_with_ort_values(["logits", *self._names("present")], values)
        cache = outputs[1:]
        tokens = np.empty((batch, new_tokens), np.int64)
        tokens[:, 0] = outputs[0].numpy()[:, -1].argmax(-1)
        logits = np.empty((batch, 1, outputs[0].shape()[-1]), np.float32)
        logits_value = ort.OrtValue.ortvalue_from_numpy(logits)
        binding = self.binding
        for step in range(1, new_tokens):
            total = length + step
            if step == 1 or not self.shared:  # shared buffers stay bound: only the inputs change
                binding.clear_binding_inputs()
                binding.clear_binding_outputs()
                binding.bind_ortvalue_output("logits", logits_value)
                for name, value in self.keep_every.items():
                    binding.bind_cpu_input(name, value)
                for name, present, value in zip(self._names("past_key_values"), self._names("present"), cache):
                    binding.bind_ortvalue_input(name, value)
                    if self.shared:
                        binding.bind_ortvalue_output(present, value)
                    else:
                        binding.bind_output(present, "cpu")
            binding.bind_cpu_input("input_ids", np.ascontiguousarray(tokens[:, step - 1 : step]))
            binding.bind_cpu_input("attention_mask", np.ascontiguousarray(mask[:, :total]))
            if "position_ids" in self.inputs:
                binding.bind_cpu_input("position_ids", np.ascontiguousarray(positions[:, total - 1 : total]))
            self.session.run_with_iobinding(binding)
            if not self.shared:
                cache = binding.get_outputs()[1:]
            tokens[:, step] = logits[:, -1].argmax(-1)
        return tokens

    def score(self, windows: np.ndarray) -> np.ndarray:
        """Logits [n, seq, vocab] of every position of `windows` [n, seq], cache empty."""
        batch, length = windows.shape
        feeds = {"input_ids": windows.astype(np.int64), "attention_mask": np.ones((batch, length), np.int64),
                 **self.keep_every}
        if "position_ids" in self.inputs:
            feeds["position_ids"] = np.arange(length, dtype=np.int64)[None].repeat(batch, 0)
        empty = np.zeros((batch, self.layout.kv_heads, 0, self.layout.head_dim), np.float32)
        feeds.update({name: empty for name in self._names("past_key_values")})
        return self.session.run(["logits"], feeds)[0]


def next_token_metrics(logits: np.ndarray, reference: np.ndarray, windows: np.ndarray) -> dict[str, float]:
    """top-1 agreement with `reference` logits, and perplexity of windows[:, 1:] under `logits`."""
    top1 = float((logits.argmax(-1) == reference.argmax(-1)).mean())
    scores = logits[:, :-1].astype(np.float64)
    scores -= scores.max(-1, keepdims=True)
    log_probs = scores - np.log(np.exp(scores).sum(-1, keepdims=True))
    picked = np.take_along_axis(log_probs, windows[:, 1:, None], -1)
    return {"top1": top1, "perplexity": math.exp(-float(picked.mean()))}


def genai_generate(model_dir: Path, prompts: np.ndarray, new_tokens: int, threads: int):
    """ONNX Runtime GenAI's own loop: returns a function generating `new_tokens` after
    `prompts` and giving back the new ids [batch, new_tokens]."""
    import onnxruntime_genai as og

    config = og.Config(str(model_dir))
    # genai_config.json's session options know no config entries: its sessions keep GenAI's own
    # spinning policy (every other session here sets allow_spinning = 0)
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
    model = og.Model(config)
    batch, length = prompts.shape

    def run() -> np.ndarray:
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, batch_size=batch, max_length=length + new_tokens,
                                  min_length=length + new_tokens)
        generator = og.Generator(model, params)
        generator.append_tokens(prompts.astype(np.int32))
        while not generator.is_done():
            generator.generate_next_token()
        return np.stack([np.asarray(generator.get_sequence(row))[length:] for row in range(batch)])

    return run
