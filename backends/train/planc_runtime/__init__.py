"""planc_runtime: the helpers a planc-generated `train.py` imports (`import planc_runtime as rt`).

planc copies this package verbatim next to the `train.py` it generates. It needs torch alone
(transformers only for Hugging Face models, tqdm only for the progress bar). `train.py` says
*what* runs, top to bottom, with the plan's values as constants; this package says *how*, one
module per concern, in the order a run meets them:

1. distributed.py     distributed setup: Parallel, init_distributed, seed_everything
2. model.py           the model: load_model (model_source.py), find_blocks, logits_of, set_dropout,
                      freeze
3. corpus.py          sentence mining for encoders, before training: collect_sentences,
                      prose_sentences, augment_sentence, planc_cache_dir
   everyday_text.py   the grammar of the `everyday` corpus
4. data.py            training data: load_token_corpus, BatchStream, heldout_batches,
                      causal_lm_loss; load_sentence_corpus, SentenceBatches,
                      sentence_heldout_batches, sentence_inputs, mean_pool
5. compress/          compression: units.py (shrink_attention_heads, shrink_mlp_channels),
                      structured.py (drop_blocks, Shrink, dense_state_dict), calibration.py
                      (activation importance and least-squares refits: calibration_batches,
                      example_batch, input_gram, output_energy, refit_columns), layers.py
                      (LowRankLinear, FakeQuantLinear, factor_low_rank, fake_quantize), masks.py
                      (PruneMasks), regularize.py (group lasso / L1 while training: regularizer)
   structure.py       the coupled heads/channels of a traced graph: planc's passes/structure.py
   ranks.py           choose_rank, the low-rank rule: planc's passes/ranks.py
   model_source.py    finding and rebuilding the model, its task and tokenizer: planc's
                      compiler/model_source.py
   gqa.py             share_kv_heads, grouped-query attention by mean-pooling key/value heads:
                      planc's passes/share/gqa.py
                      (these four are planc's own files, which emit copies in: SHARED_MODULES in
                      planc's backends/train/shared_modules.py)
6. distill.py         distillation: Distiller, EncoderDistiller, the teacher cache
7. steps.py           step mechanics: make_optimizer, lr_multiplier, make_grad_scaler,
                      clip_grad_norm, autocast, checkpoint_blocks
8. parallel.py        parallelism: wrap_ddp, all_reduce_grads, shard_fsdp, parallelize_tensor,
                      split_blocks, DecoderStage
9. checkpoint.py      checkpoints: Checkpointer, full_state_dict, save_atomically, rng_state
10. logs.py           logging and faults: setup_logging, MetricsLog, ProgressBar, StepTimer,
                      maybe_fail, mean_over, global_mean, loss_weight

The names below are those `train.py` (and planc's tests) call; everything else lives in its module.
"""

from __future__ import annotations

import importlib as _importlib
import importlib.util as _import_util
import sys as _sys

if _import_util.find_spec(f"{__name__}.structure") is None:
    # planc's own tree: the modules emit copies in (SHARED_MODULES) are planc's, imported here
    # under the runtime's names; an emitted program has the files and never gets here.
    from planc.backends.train.shared_modules import SHARED_MODULES as _SHARED

    for _name, _module in _SHARED.items():
        _sys.modules[f"{__name__}.{_name}"] = _importlib.import_module(_module)

from .checkpoint import Checkpointer, full_state_dict, rng_state, save_atomically, set_rng_state
from .compress import (
    FakeQuantLinear,
    LowRankLinear,
    PruneMasks,
    Shrink,
    calibration_batches,
    dense_state_dict,
    drop_blocks,
    example_batch,
    factor_low_rank,
    fake_quantize,
    input_gram,
    output_energy,
    refit_columns,
    regularizer,
    shrink_attention_heads,
    shrink_mlp_channels,
)
from .corpus import augment_sentence, collect_sentences, planc_cache_dir, prose_sentences
from .data import (
    BatchStream,
    SentenceBatches,
    causal_lm_loss,
    heldout_batches,
    load_sentence_corpus,
    load_token_corpus,
    mean_pool,
    pack,
    read_documents,
    sentence_heldout_batches,
    sentence_inputs,
    split_heldout,
    tokenize,
)
from .distill import Distiller, EncoderDistiller
from .distributed import Parallel, init_distributed, seed_everything
from .gqa import share_kv_heads
from .logs import MetricsLog, ProgressBar, StepTimer, global_mean, loss_weight, maybe_fail, mean_over, setup_logging
from .model import find_blocks, freeze, load_model, logits_of, set_dropout
from .parallel import DecoderStage, all_reduce_grads, parallelize_tensor, shard_fsdp, split_blocks, wrap_ddp
from .steps import autocast, checkpoint_blocks, clip_grad_norm, lr_multiplier, make_grad_scaler, make_optimizer

__all__ = [
    "BatchStream",
    "Checkpointer",
    "DecoderStage",
    "Distiller",
    "EncoderDistiller",
    "FakeQuantLinear",
    "LowRankLinear",
    "MetricsLog",
    "Parallel",
    "ProgressBar",
    "PruneMasks",
    "SentenceBatches",
    "Shrink",
    "StepTimer",
    "all_reduce_grads",
    "augment_sentence",
    "autocast",
    "calibration_batches",
    "causal_lm_loss",
    "checkpoint_blocks",
    "clip_grad_norm",
    "collect_sentences",
    "dense_state_dict",
    "drop_blocks",
    "example_batch",
    "factor_low_rank",
    "fake_quantize",
    "find_blocks",
    "freeze",
    "full_state_dict",
    "global_mean",
    "heldout_batches",
    "init_distributed",
    "input_gram",
    "load_model",
    "load_sentence_corpus",
    "load_token_corpus",
    "logits_of",
    "loss_weight",
    "lr_multiplier",
    "make_grad_scaler",
    "make_optimizer",
    "maybe_fail",
    "mean_over",
    "mean_pool",
    "output_energy",
    "pack",
    "parallelize_tensor",
    "planc_cache_dir",
    "prose_sentences",
    "read_documents",
    "refit_columns",
    "regularizer",
    "rng_state",
    "save_atomically",
    "seed_everything",
    "sentence_heldout_batches",
    "sentence_inputs",
    "set_dropout",
    "set_rng_state",
    "setup_logging",
    "shard_fsdp",
    "share_kv_heads",
    "shrink_attention_heads",
    "shrink_mlp_channels",
    "split_blocks",
    "split_heldout",
    "tokenize",
    "wrap_ddp",
]
