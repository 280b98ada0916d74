"""A decoder LM compiled into one ONNX graph with a key/value cache: its export, the serving
rewrites, verification against the eager model, and generation from the artifact.

Import the modules themselves (this package re-exports nothing and imports nothing heavy):

- `exporter`: the key/value-cache export (`export_decoder`, `capture_decoder`, `DecoderSpec`, ...);
- `cache_adapter`: the cache-in, cache-out forward the exporter traces, for each supported model;
- `fusions`: ONNX Runtime fusions of the exported graph, kept only when they compute the same;
- `serving`: GroupQueryAttention, a shared key/value buffer, logits of the last positions only;
- `patterns`: the graph patterns the serving rewrites look for;
- `quantize`: int8/int4 weights with ONNX Runtime's quantization tools;
- `tokenizer`: text <-> token ids (raw bytes or a Hugging Face `tokenizer.json`);
- `verify`: the artifact checked against the eager model it was exported from;
- `session`: one artifact in ONNX Runtime (`DecoderSession`: prefill, decode steps, extension);
- `speculative`: speculative decoding with a draft decoder (greedy, exact);
- `generate`: batched generation, plain or speculative (`generate_ids`, `measure`, the CLI);
- `artifact`: the decoder artifact of `target onnx { decode { ... } }`: export, verify, measure, publish.
"""
