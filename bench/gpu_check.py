"""Check planc's CUDA paths on a GPU machine and print figures: the cast pass (fp16/bf16 with
fp32 islands) on a MiniLM-shaped BERT, run by torch on CUDA, against the fp32 model.

    python bench/gpu_check.py [--batch 8] [--seq 128]

(The training programs' nccl paths are checked by running `planc compile` + `launch.sh` on a
GPU machine; ONNX Runtime's CUDA provider needs the onnxruntime-gpu package.)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from transformers import BertConfig, BertModel

from planc.passes.base import PassContext
from planc.passes.manager import PassManager
from planc.passes.cast import Cast
from planc.passes.registry import load_pass


def minilm_shaped_bert() -> BertModel:
    config = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
    torch.manual_seed(0)
    return BertModel(config, add_pooling_layer=False).eval()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, runs: int = 50) -> float:
    for _ in range(5):
        fn()
    sync()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        sync()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    model = minilm_shaped_bert()
    ids = torch.randint(1000, 30000, (args.batch, args.seq))
    mask = torch.ones_like(ids)
    mask[0, args.seq // 2 :] = 0  # padding in one row
    inputs = {"input_ids": ids, "attention_mask": mask}
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=512)
    shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    try:
        graph = torch.export.export(model, (), kwargs=inputs, dynamic_shapes=shapes, strict=False).module()
    except Exception as error:  # older torch releases on GPU images: fall back to static shapes
        print(f"dynamic export failed ({type(error).__name__}: {str(error).splitlines()[0][:200]}); exporting static shapes")
        graph = torch.export.export(model, (), kwargs=inputs, strict=False).module()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda_inputs = {k: v.to(device) for k, v in inputs.items()}
    reference = copy.deepcopy(model).to(device)
    with torch.no_grad():
        expected = reference(**cuda_inputs).last_hidden_state
        rows = [f"{torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}  batch {args.batch} seq {args.seq}", "variant         ms     x fp32   min cosine"]
        fp32_ms = timed(lambda: reference(**cuda_inputs))
        rows.append(f"eager fp32   {fp32_ms:7.3f}   {1.0:6.2f}   1.0000")
        for dtype in ("fp16", "bf16"):
            context = PassContext(model=model, example_inputs=inputs, targets=frozenset(), source="gpu_check")
            cast, _ = PassManager().run(graph, [(load_pass(Cast(dtype=dtype)), context)])
            cast = cast.to(device)
            output = cast(**cuda_inputs)
            hidden = output[0] if isinstance(output, (tuple, list)) else output.last_hidden_state
            cosine = F.cosine_similarity(hidden.float().flatten(1), expected.flatten(1)).min().item()
            ms = timed(lambda: cast(**cuda_inputs))
            rows.append(f"planc {dtype}   {ms:7.3f}   {fp32_ms / ms:6.2f}   {cosine:.4f}")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
