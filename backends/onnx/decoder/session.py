"""One decoder artifact in ONNX Runtime: prefill, decode steps and multi-token extension.

Prompts are left-padded (attention_mask 0, position_ids = cumsum(mask) - 1 clamped at 0), so
every row's newest token sits in the last column and one graph call advances the whole batch.
The cache never visits Python. A graph whose decoder.json says `kv_buffer: shared` gets one
buffer per key/value, allocated once per generation with room for the prompt and every new
token, bound through I/O binding as both `past_key_values.*` and `present.*`: the attention
kernel writes each step's keys/values into it in place. Other graphs get the previous step's
`present.*` OrtValues bound as the next `past_key_values.*`. Either way the cache stays on the
execution provider's device (GPU memory under CUDA), the prefill asks for the last position's
logits only where the graph takes `logits_to_keep` (other calls ask for every position), and
the logits come back to the host into a buffer preallocated once per generation.

Plain generation (`generate.py`) and speculative decoding (`speculative.py`) both drive it and
commit tokens with `commit_position`, so both stop exactly alike.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from planc.backends.onnx.decoder.exporter import MODEL_FILE, DecoderSpec, input_names, output_names
from planc.backends.onnx.decoder.serving import LOGITS_TO_KEEP, logits_to_keep_feed
from planc.backends.onnx.decoder.tokenizer import Tokenizer, load_tokenizer
from planc.backends.onnx.runtime import create_session, resolve_providers

logger = logging.getLogger(__name__)


class DecoderSession:
    """One decoder artifact loaded in ONNX Runtime, driving prefill and decode steps.

    `prefill(ids, mask)` starts a batch and returns the last position's logits [batch, vocab];
    `step(next_ids)` appends one token per row and returns the new logits. The cache between
    calls is a list of OrtValues owned by ORT (on the provider's device).
    """

    def __init__(
        self,
        artifact_dir: str | Path,
        providers: Sequence[str] = ("auto",),
        threads: int | None = None,
        optimization: str = "all",
    ) -> None:
        self.artifact_dir = Path(artifact_dir)
        self.spec = DecoderSpec.load(self.artifact_dir)
        # threads 0 = ONNX Runtime's default (one per physical core)
        self.session = create_session(
            self.artifact_dir / MODEL_FILE, resolve_providers(providers), threads or 0, optimization
        )
        self._check_signature()
        # `logits_to_keep` feeds where the graph takes it; held here, since a decode step's
        # binding may keep referring to its array after the call that bound it
        inputs = [i.name for i in self.session.get_inputs()]
        self._keep_every, self._keep_last = logits_to_keep_feed(inputs), logits_to_keep_feed(inputs, last=1)
        on_cuda = self.session.get_providers()[0] in ("CUDAExecutionProvider", "TensorrtExecutionProvider")
        self.device = "cuda" if on_cuda else "cpu"
        self.tokenizer: Tokenizer = load_tokenizer(self.artifact_dir, self.spec.tokenizer)
        self._binding = self.session.io_binding()
        self._past: list | None = None
        self._mask = np.zeros((0, 0), np.int64)
        self._length = 0
        self._positions = np.zeros(0, np.int64)
        self._logits = None
        self._logits_host = np.zeros((0, 1, 0), np.float32)
        self.shared_buffer = self.spec.kv_buffer == "shared"
        self._cache_bound = False  #: shared buffers and logits bound in `_binding` already

    def _check_signature(self) -> None:
        got_in = [i.name for i in self.session.get_inputs()]
        got_out = [o.name for o in self.session.get_outputs()]
        want_in = input_names(self.spec.n_layer, LOGITS_TO_KEEP in got_in)
        want_out = output_names(self.spec.n_layer)
        if sorted(got_in) != sorted(want_in) or sorted(got_out) != sorted(want_out):
            raise ValueError(
                f"{self.artifact_dir / MODEL_FILE} does not have the decoder signature of decoder.json: "
                f"inputs {got_in}, outputs {got_out}"
            )

    @property
    def batch(self) -> int:
        return self._mask.shape[0]

    def _cache_run(self, input_ids: np.ndarray, positions: np.ndarray, every_position: bool = False) -> np.ndarray:
        """One call over the cache (a decode step, or `extend`'s chunk); returns the logits of the
        last position [batch, vocab], or of every fed position [batch, seq, vocab].

        Between decode steps, shared buffers and the logits buffer stay bound: only the three
        small inputs are bound again (the same names replace the previous step's); so does
        `logits_to_keep` = 0 (every fed position: one in a decode step)."""
        binding = self._binding
        if every_position or not self._cache_bound:
            binding.clear_binding_inputs()
            binding.clear_binding_outputs()
            if every_position:
                binding.bind_output("logits", "cpu")
            else:
                binding.bind_ortvalue_output("logits", self._logits)  # preallocated, reused every step
            for name, value in self._keep_every.items():
                binding.bind_cpu_input(name, value)
            for i, (key, value) in enumerate(self._past):
                for kind, tensor in (("key", key), ("value", value)):
                    if isinstance(tensor, np.ndarray):  # a growing cache after `rollback`
                        binding.bind_cpu_input(f"past_key_values.{i}.{kind}", tensor)
                    else:
                        binding.bind_ortvalue_input(f"past_key_values.{i}.{kind}", tensor)
                    if self.shared_buffer:
                        binding.bind_ortvalue_output(f"present.{i}.{kind}", tensor)  # written in place
                    else:
                        binding.bind_output(f"present.{i}.{kind}", self.device)
            self._cache_bound = self.shared_buffer and not every_position
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
        binding.bind_cpu_input("attention_mask", np.ascontiguousarray(self._mask[:, : self._length]))
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(positions, dtype=np.int64))
        self.session.run_with_iobinding(binding)
        if every_position or not self.shared_buffer:
            outputs = binding.get_outputs()
            if not self.shared_buffer:
                self._past = [(outputs[1 + 2 * i], outputs[2 + 2 * i]) for i in range(self.spec.n_layer)]
            if every_position:
                return outputs[0].numpy()
        return self._logits_host[:, -1, :].copy()

    def _prefill_run(self, input_ids: np.ndarray, positions: np.ndarray, slots: int) -> np.ndarray:
        """The prefill call; its presents become the cache. A shared-buffer graph is given
        zeroed pasts of `slots` positions, and its presents are as long: those are the buffers
        later steps write into. `logits_to_keep` = 1 asks for the last position's logits only."""
        import onnxruntime as ort

        batch = input_ids.shape[0]
        feeds = {
            "input_ids": np.ascontiguousarray(input_ids, dtype=np.int64),
            "attention_mask": np.ascontiguousarray(self._mask[:, : self._length]),
            "position_ids": np.ascontiguousarray(positions, dtype=np.int64),
            **self._keep_last,
        }
        for i, heads in enumerate(self.spec.kv_heads):
            empty = np.zeros((batch, heads, slots if self.shared_buffer else 0, self.spec.head_dim), np.float32)
            feeds[f"past_key_values.{i}.key"] = feeds[f"past_key_values.{i}.value"] = empty
        values = {name: ort.OrtValue.ortvalue_from_numpy(array, self.device if name.startswith("past") else "cpu")
                  for name, array in feeds.items()}
        outputs = self.session.run_with_ort_values(output_names(self.spec.n_layer), values)
        self._past = [(outputs[1 + 2 * i], outputs[2 + 2 * i]) for i in range(self.spec.n_layer)]
        self._cache_bound = False
        return outputs[0].numpy()[:, -1, :]

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray, max_new_tokens: int = 0) -> np.ndarray:
        """Start a batch from left-padded prompts; room is reserved for `max_new_tokens` more."""
        import onnxruntime as ort

        batch, seq = input_ids.shape
        limit = self.spec.max_positions
        if limit is not None and seq + max_new_tokens > limit:
            raise ValueError(
                f"prompt of {seq} tokens + {max_new_tokens} new tokens exceeds the model's "
                f"{limit} positions: shorten the prompt or lower max_new_tokens"
            )
        self._mask = np.zeros((batch, seq + max_new_tokens), np.int64)
        self._mask[:, :seq] = attention_mask
        self._length = seq
        self._positions = attention_mask.sum(axis=1).astype(np.int64)  # next position of each row
        positions = np.clip(np.cumsum(attention_mask, axis=1) - 1, 0, None)
        logits = self._prefill_run(input_ids, positions, seq + max(max_new_tokens, 1))
        self._logits_host = np.empty((batch, 1, self.spec.vocab), np.float32)
        self._logits = ort.OrtValue.ortvalue_from_numpy(self._logits_host)
        return logits

    def _grow_buffers(self, slots: int) -> None:
        """Copy the shared buffers into longer ones: a generation ran past its reserved length."""
        import onnxruntime as ort

        grown = []
        for pair in self._past:
            longer = []
            for buffer in pair:
                host = buffer.numpy()
                copy = np.zeros((*host.shape[:2], slots, host.shape[3]), np.float32)
                copy[:, :, : host.shape[2]] = host
                longer.append(ort.OrtValue.ortvalue_from_numpy(copy, self.device))
            grown.append(tuple(longer))
        self._past = grown
        self._cache_bound = False

    def _reserve(self, width: int) -> None:
        """Room in the shared buffers for `width` more positions (grown when a generation runs
        past the length reserved at prefill)."""
        if self.shared_buffer and self._length + width > self._past[0][0].shape()[2]:
            self._grow_buffers(max(self._mask.shape[1], self._length + width))

    def step(self, next_ids: np.ndarray) -> np.ndarray:
        """Append one token per row (finished rows included: they are fed padding)."""
        if self._past is None:
            raise RuntimeError("step() before prefill(): start a batch first")
        if self._length >= self._mask.shape[1]:
            grown = np.zeros((self.batch, self._mask.shape[1] + 16), np.int64)
            grown[:, : self._length] = self._mask[:, : self._length]
            self._mask = grown
        self._reserve(1)
        self._mask[:, self._length] = 1
        self._length += 1
        ids = np.asarray(next_ids, np.int64).reshape(-1, 1)
        logits = self._cache_run(ids, self._positions[:, None])
        self._positions += 1
        return logits

    def extend(self, ids: np.ndarray) -> np.ndarray:
        """Append `ids` [batch, m] to every row in one call over the cache; returns the logits of
        all m positions [batch, m, vocab] (speculative decoding verifies m drafted tokens so)."""
        if self._past is None:
            raise RuntimeError("extend() before prefill(): start a batch first")
        ids = np.asarray(ids, np.int64)
        width = ids.shape[1]
        if self._length + width > self._mask.shape[1]:
            grown = np.zeros((self.batch, self._length + width + 16), np.int64)
            grown[:, : self._length] = self._mask[:, : self._length]
            self._mask = grown
        self._reserve(width)
        self._mask[:, self._length : self._length + width] = 1
        self._length += width
        positions = self._positions[:, None] + np.arange(width, dtype=np.int64)
        logits = self._cache_run(ids, positions, every_position=True)
        self._positions += width
        return logits

    def rollback(self, count: int) -> None:
        """Forget the last `count` positions of every row (drafted tokens that were rejected).
        A shared buffer keeps its slots (the next call overwrites them and reads only up to the
        mask's length); a growing cache's kept part is copied to host numpy arrays, bound as
        inputs by the next call."""
        if self._past is None or not 0 <= count <= self._length:
            raise ValueError(f"cannot roll back {count} of {self._length} cached positions")
        if count == 0:
            return
        keep = self._length - count
        if not self.shared_buffer:
            self._past = [
                tuple(np.ascontiguousarray(np.asarray(t if isinstance(t, np.ndarray) else t.numpy())[:, :, :keep])
                      for t in pair)
                for pair in self._past
            ]
        self._mask[:, keep : self._length] = 0
        self._length = keep
        self._positions -= count

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
        """Logits at every position [batch, seq, vocab] of one cache-less call (scoring text)."""
        input_ids = np.asarray(input_ids, np.int64)
        batch = input_ids.shape[0]
        mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask, np.int64)
        feeds = {
            "input_ids": input_ids,
            "attention_mask": mask,
            "position_ids": np.clip(np.cumsum(mask, axis=1) - 1, 0, None),
            **self._keep_every,
        }
        for i, heads in enumerate(self.spec.kv_heads):
            empty = np.zeros((batch, heads, 0, self.spec.head_dim), np.float32)
            feeds[f"past_key_values.{i}.key"] = empty
            feeds[f"past_key_values.{i}.value"] = empty
        return self.session.run(["logits"], feeds)[0]

    def encode(self, prompts: Sequence[str]) -> list[list[int]]:
        rows = [self.tokenizer.encode(p) for p in prompts]
        for prompt, row in zip(prompts, rows):
            if not row:
                raise ValueError(f"prompt {prompt!r} encodes to no tokens: generation needs at least one")
        return rows


def open_session(artifact: DecoderSession | str | Path, **session_options) -> DecoderSession:
    return artifact if isinstance(artifact, DecoderSession) else DecoderSession(artifact, **session_options)


def commit_position(
    tokens: Sequence[int],
    outputs: list[list[int]],
    done: np.ndarray,
    eos: set[int],
    stop: Callable[[int, list[int]], bool] | None,
) -> list[int | None]:
    """Append one generated position (a token per row) to the unfinished rows, marking rows
    that end with it; returns what each row received (None: finished before). Plain and
    speculative decoding share it, so both stop exactly alike."""
    reported: list[int | None] = []
    for row, token in enumerate(tokens):
        if done[row]:
            reported.append(None)
            continue
        outputs[row].append(token)
        reported.append(token)
        if token in eos or (stop is not None and stop(row, outputs[row])):
            done[row] = True
    return reported
