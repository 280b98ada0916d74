"""The one model source: a plan's `model` block -> an eager model, its tokenizer, inputs and graph.

Everything that needs the plan's model goes through here: capture for the passes, the ONNX
and decoder exports, verification, the training program's emitter. Each step raises
`FrontendError` with a message a user can act on (the driver reports it at the plan's `model`
line):

1. `load_model` (`load.py`): run the named factory (a file or an importable module) or load a
   local Hugging Face directory offline; resolve the task (`encoder` or `causal_lm`); check
   that `forward` accepts every declared input; build the tokenizer (`tokenizers.py`) and a
   realistic, padded example batch; map symbolic dims to `torch.export.Dim`s. Finding and
   rebuilding the model is `source.py`, which the training program carries unchanged:
   `model_spec` names the model for it, `model_task` decides the task without capturing.
2. `capture` (`capture.py`): `torch.export` with those dynamic dims, else `symbolic_trace` with
   untraceable submodules as leaves; checked against the eager model. `module_table` lists
   what selectors match.
3. `load_samples`, `model_output`, `embed` (`outputs.py`): text files as model inputs, and the
   one tensor verification compares (sentence embeddings for encoders, logits for causal LMs).
"""

from __future__ import annotations

from planc.compiler.model.capture import capture, module_table
from planc.compiler.model.common import FrontendError, Task, primary_output
from planc.compiler.model.load import LoadedModel, load_hf_directory, load_model, model_spec, model_task
from planc.compiler.model.outputs import embed, load_samples, model_output
from planc.compiler.model.tokenizers import ByteTokenizer, HFTokenizer, Tokenizer

__all__ = [
    "ByteTokenizer",
    "FrontendError",
    "HFTokenizer",
    "LoadedModel",
    "Task",
    "Tokenizer",
    "capture",
    "embed",
    "load_hf_directory",
    "load_model",
    "load_samples",
    "model_output",
    "model_spec",
    "model_task",
    "module_table",
    "primary_output",
]
