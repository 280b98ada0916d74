"""Serving rewrites of decoder graphs (GroupQueryAttention, shared key/value buffer,
`logits_to_keep`) and the fusion probe, each checked against the eager model."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from planc.backends.onnx.decoder.cache_adapter import adapt, empty_past, position_ids_from_mask
from planc.backends.onnx.decoder.exporter import DecoderSpec
from planc.backends.onnx.decoder.session import DecoderSession
from planc.backends.onnx.decoder.verify import eager_greedy


def _eager_logits(model, ids: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    adapter = adapt(model)
    with torch.no_grad():
        return adapter(ids, mask, position_ids_from_mask(mask), empty_past(adapter.cache_layout(), len(ids)))[0].numpy()


def _session(path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path / "model.onnx"), options, providers=["CPUExecutionProvider"])


def test_llama_serves_with_group_query_attention_and_a_shared_buffer(artifacts, llama_model):
    spec = DecoderSpec.load(artifacts("llama"))
    assert spec.kv_buffer == "shared" and spec.logits_to_keep
    assert spec.fusions["group_query_attention"] == llama_model.config.num_hidden_layers
    nodes = onnx.load(artifacts("llama") / "model.onnx").graph.node
    ops = Counter(n.op_type for n in nodes)
    assert ops["GroupQueryAttention"] == spec.n_layer and not ops["MultiHeadAttention"]
    rotary = [next((a.i for a in n.attribute if a.name == "do_rotary"), 0) for n in nodes if n.op_type == "GroupQueryAttention"]
    assert rotary == [1] * spec.n_layer  # rotary embeddings inside the kernel


def test_shared_buffer_decodes_past_its_reserved_room(artifacts, llama_model):
    """Prefill reserves room for 1 token; 14 more steps grow the buffers. Every step's logits
    equal a cache-less eager forward of the whole left-padded sequence."""
    session = DecoderSession(artifacts("llama"), threads=1)
    assert session.shared_buffer
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, session.spec.vocab, (2, 19), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    full = _eager_logits(llama_model, ids, mask)
    prompt = 5
    logits = session.prefill(ids[:, :prompt].numpy(), mask[:, :prompt].numpy(), max_new_tokens=1)
    np.testing.assert_allclose(logits, full[:, prompt - 1], atol=1e-4, rtol=1e-4)
    for t in range(prompt, ids.shape[1]):
        logits = session.step(ids[:, t].numpy())
        np.testing.assert_allclose(logits, full[:, t], atol=1e-4, rtol=1e-4)
    assert session._past[0][0].shape()[2] > prompt + 1  # the buffers grew


def test_a_generic_loop_drives_the_shared_buffer_by_the_documented_names(artifacts, llama_model):
    """The README's contract, written out independently of planc's runtime: one zeroed
    [batch, kv_heads, max_length, head_dim] buffer per key/value bound as past and present,
    the mask growing by one column per step, `logits_to_keep` = 0 (the graph has no default for
    it). Greedy tokens equal the eager model's."""
    spec = DecoderSpec.load(artifacts("llama"))
    session = _session(artifacts("llama"))
    prompts = [[5, 9, 30, 7, 2, 11], [40, 8, 3]]
    width, new = 6, 8
    ids = np.array([[0] * (width - len(p)) + p for p in prompts], np.int64)
    mask = np.array([[0] * (width - len(p)) + [1] * len(p) for p in prompts], np.int64)
    buffers = [ort.OrtValue.ortvalue_from_numpy(np.zeros((2, h, width + new, spec.head_dim), np.float32))
               for h in spec.kv_heads for _ in range(2)]
    names = [f"{i}.{kind}" for i in range(spec.n_layer) for kind in ("key", "value")]
    tokens: list[list[int]] = [[], []]
    step_ids, positions = ids, np.clip(mask.cumsum(1) - 1, 0, None)
    for _ in range(new):
        binding = session.io_binding()
        binding.bind_output("logits", "cpu")
        for name, array in (("input_ids", step_ids), ("attention_mask", mask), ("position_ids", positions),
                            ("logits_to_keep", np.zeros(1, np.int64))):
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        for name, buffer in zip(names, buffers):
            binding.bind_ortvalue_input(f"past_key_values.{name}", buffer)
            binding.bind_ortvalue_output(f"present.{name}", buffer)
        session.run_with_iobinding(binding)
        chosen = binding.get_outputs()[0].numpy()[:, -1].argmax(-1)
        for row, token in enumerate(chosen.tolist()):
            tokens[row].append(token)
        step_ids = chosen[:, None].astype(np.int64)
        positions = positions[:, -1:] + 1
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
    assert tokens == eager_greedy(llama_model, prompts, new, 0, [])


@pytest.mark.parametrize("name", ["gpt", "llama"])
def test_logits_to_keep(artifacts, decoders, name):
    """0: every position (scoring); 1: the last position only (a prefill)."""
    session = _session(artifacts(name))
    spec = DecoderSpec.load(artifacts(name))
    ids = torch.tensor([[3, 50, 7, 9, 12], [8, 8, 20, 4, 6]])
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": position_ids_from_mask(mask).numpy()}
    for i, heads in enumerate(spec.kv_heads):
        feeds[f"past_key_values.{i}.key"] = feeds[f"past_key_values.{i}.value"] = np.zeros((2, heads, 0, spec.head_dim), np.float32)
    eager = _eager_logits(decoders[name], ids, mask)
    every = session.run(["logits"], {**feeds, "logits_to_keep": np.array([0], np.int64)})[0]
    last = session.run(["logits"], {**feeds, "logits_to_keep": np.array([1], np.int64)})[0]
    assert every.shape == eager.shape and last.shape == (2, 1, eager.shape[-1])
    real = mask.numpy().astype(bool)
    np.testing.assert_allclose(every[real], eager[real], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(last[:, 0], eager[:, -1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("form", ["initializer", "absent"])
def test_graphs_without_the_logits_to_keep_input_still_generate(tmp_path, artifacts, form):
    """Artifacts written before `logits_to_keep` became a plain input hold it as an initializer
    of default 0 (not among the session's inputs); graphs the rewrite did not apply to lack it.
    Neither is fed it, both return every position, and both generate what the graph that takes
    `logits_to_keep` = 1 in its prefill generates."""
    import shutil

    from planc.backends.onnx.decoder.generate import generate_ids

    shutil.copytree(artifacts("llama"), tmp_path / "art")
    model = onnx.load(tmp_path / "art" / "model.onnx")
    (keep,) = [i for i in model.graph.input if i.name == "logits_to_keep"]
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros(1, np.int64), "logits_to_keep"))
    if form == "absent":
        model.graph.input.remove(keep)  # a constant 0: the LM head reads every position
    onnx.save(model, tmp_path / "art" / "model.onnx")
    old, new = DecoderSession(tmp_path / "art", threads=1), DecoderSession(artifacts("llama"), threads=1)
    assert "logits_to_keep" not in {i.name for i in old.session.get_inputs()}
    ids = np.array([[5, 9, 30, 7, 2, 11]], np.int64)
    np.testing.assert_allclose(old.logits(ids), new.logits(ids), atol=1e-5, rtol=1e-5)
    rows = [[5, 9, 30, 7, 2, 11], [40, 8, 3]]
    assert generate_ids(old, rows, 8) == generate_ids(new, rows, 8)


def test_a_fusion_that_changes_only_padded_positions_is_kept(tmp_path, gpt_model, monkeypatch):
    """Padded positions are never read: what a fused graph computes there does not count
    (issue 14: exact fusions were refused on left-padded input for that reason)."""
    import onnx_ir as ir

    import planc.backends.onnx.decoder.fusions as decoder_fusions

    real_fusions = decoder_fusions.apply_ort_fusions

    def fuse_and_scribble_on_padding(model) -> dict[str, int]:
        applied = real_fusions(model)
        graph = model.graph
        logits = next(v for v in graph.outputs if v.name == "logits")
        mask = next(v for v in graph.inputs if v.name == "attention_mask")
        ids = next(v for v in graph.inputs if v.name == "input_ids")

        def const(name, array):
            value = ir.Value(name=name, const_value=ir.tensor(np.asarray(array), name=name))
            graph.register_initializer(value)
            return value

        nodes = [ir.node("Cast", [mask], {"to": ir.DataType.FLOAT})]
        nodes.append(ir.node("Shape", [ids], {"start": 1, "end": 2}))
        nodes.append(ir.node("Neg", [nodes[-1].outputs[0]]))
        nodes.append(ir.node("Slice", [nodes[0].outputs[0], nodes[-1].outputs[0], const("big", [1 << 30]), const("ax", [1])]))
        nodes.append(ir.node("Sub", [const("one", np.float32(1)), nodes[-1].outputs[0]]))  # 1 at padded tokens
        nodes.append(ir.node("Mul", [nodes[-1].outputs[0], const("five", np.float32(5))]))
        nodes.append(ir.node("Unsqueeze", [nodes[-1].outputs[0], const("last", [2])]))
        producer = logits.producer()
        graph.insert_after(producer, nodes)
        add = ir.node("Add", [logits, nodes[-1].outputs[0]])
        graph.insert_after(nodes[-1], add)
        index = list(graph.outputs).index(logits)
        logits.name = "logits_before"
        graph.outputs[index] = add.outputs[0]
        add.outputs[0].name = "logits"
        return {**applied, "scribble": 1}

    monkeypatch.setattr(decoder_fusions, "apply_ort_fusions", fuse_and_scribble_on_padding)
    from planc.backends.onnx.decoder.exporter import export_decoder

    spec = export_decoder(gpt_model, tmp_path / "art")
    assert spec.fusions.get("scribble") == 1  # kept: real positions are unchanged
    session = DecoderSession(tmp_path / "art", threads=1)
    ids, mask = np.array([[1, 1, 3, 50, 7]]), np.array([[0, 0, 1, 1, 1]])
    full = session.logits(ids, mask)
    eager = _eager_logits(gpt_model, torch.from_numpy(ids), torch.from_numpy(mask))
    np.testing.assert_allclose(full[0, 2:], eager[0, 2:], atol=1e-4, rtol=1e-4)
    assert np.abs(full[0, :2] - eager[0, :2]).max() > 4  # the scribble is really there


def test_plain_causal_bias_probe(llama_model):
    """Llama's mask is causal + padding; a sliding window of 2 is more, and the probe says so."""
    import transformers

    from planc.backends.onnx.decoder.exporter import _with_weights_as_matmul, export_onnx
    from planc.backends.onnx.decoder.fusions import apply_ort_fusions
    from planc.backends.onnx.decoder.patterns import plain_causal_bias

    config = transformers.MistralConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        sliding_window=2)
    torch.manual_seed(0)
    mistral = transformers.MistralForCausalLM(config).eval()
    verdicts = {}
    for name, model in (("llama", llama_model), ("mistral", mistral)):
        graph = _with_weights_as_matmul(export_onnx(adapt(model)))
        apply_ort_fusions(graph)
        biases = [n.inputs[5] for n in graph.graph if n.op_type == "MultiHeadAttention"]
        assert biases
        verdicts[name] = plain_causal_bias(graph, biases[0])
    assert verdicts == {"llama": True, "mistral": False}
    assert adapt(mistral).attention_window() and not adapt(llama_model).attention_window()


def test_merged_int4_projections_compute_what_separate_ones_do(tmp_path, llama_model, monkeypatch):
    """q|k|v and gate|up in one MatMulNBits each: the logits equal the separate projections'."""
    import planc.backends.onnx.decoder.serving as decoder_serving
    from planc.backends.onnx.decoder.exporter import export_decoder

    merged = export_decoder(llama_model, tmp_path / "merged", quantize="int4")
    assert merged.fusions["merged_int4_projections"] == llama_model.config.num_hidden_layers
    monkeypatch.setattr(decoder_serving, "merge_int4_siblings", lambda model: 0)
    monkeypatch.setattr(decoder_serving.patterns, "pack_int4", lambda values: None)
    separate = export_decoder(llama_model, tmp_path / "separate", quantize="int4")
    assert "merged_int4_projections" not in separate.fusions
    count = lambda path: Counter(n.op_type for n in onnx.load(path / "model.onnx").graph.node)["MatMulNBits"]  # noqa: E731
    layers = llama_model.config.num_hidden_layers
    assert count(tmp_path / "separate") == 7 * layers + 1 and count(tmp_path / "merged") == 4 * layers + 1
    ids = np.array([[5, 9, 30, 7, 2, 11, 40, 8]], np.int64)
    np.testing.assert_allclose(DecoderSession(tmp_path / "merged").logits(ids),
                               DecoderSession(tmp_path / "separate").logits(ids), atol=1e-5, rtol=1e-5)
