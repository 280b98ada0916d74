"""A small GPT decoder used by the example plans: byte-level, pre-norm, learned positions.

Written to be captured by torch.export and compressed by planc's passes:
- every projection is its own `nn.Linear` (q/k/v/out, fc_in/fc_out), so structured pruning
  of heads and MLP channels can shrink them and their consumers;
- attention reshapes with `-1` heads, so a pruned block runs with fewer heads;
- `n_kv_head` < `n_head` gives grouped-query attention (Ainslie et al. 2023): key/value
  projections of `n_kv_head` heads, each serving `n_head / n_kv_head` consecutive query heads,
  so the key/value cache holds `n_kv_head` heads (planc's `share { kv_heads = N }` makes one
  from a trained multi-head model); the grouping is read from the shapes, like the head count;
- `forward` optionally takes and returns a key/value cache, for the decoding target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 256
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    max_seq: int = 256
    mlp_ratio: int = 4
    #: Key/value heads (None: one per query head, plain multi-head attention).
    n_kv_head: int | None = None


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[batch, kv_heads, seq, dim] -> [batch, kv_heads * groups, seq, dim]: kv head j serves
    query heads j*groups .. j*groups + groups - 1 (what Hugging Face's `repeat_kv` does)."""
    if groups == 1:
        return x
    batch, heads, seq, dim = x.shape
    return x[:, :, None].expand(batch, heads, groups, seq, dim).reshape(batch, heads * groups, seq, dim)


class Attention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.head_dim = config.d_model // config.n_head
        kv_width = (config.n_kv_head or config.n_head) * self.head_dim
        self.q_proj = nn.Linear(config.d_model, config.d_model)
        self.k_proj = nn.Linear(config.d_model, kv_width)
        self.v_proj = nn.Linear(config.d_model, kv_width)
        self.out_proj = nn.Linear(config.d_model, config.d_model)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        return x.view(batch, seq, -1, self.head_dim).transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        batch, seq, _ = x.shape
        q, k, v = self._heads(self.q_proj(x)), self._heads(self.k_proj(x)), self._heads(self.v_proj(x))
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        groups = q.shape[1] // k.shape[1]  # the cache keeps the kv heads; attention repeats them
        y = F.scaled_dot_product_attention(q, repeat_kv(k, groups), repeat_kv(v, groups), attn_mask=mask)
        y = y.transpose(1, 2).reshape(batch, seq, -1)
        return self.out_proj(y), (k, v)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fc_in = nn.Linear(config.d_model, config.mlp_ratio * config.d_model)
        self.fc_out = nn.Linear(config.mlp_ratio * config.d_model, config.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(F.gelu(self.fc_in(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model)
        self.attn = Attention(config)
        self.ln_2 = nn.LayerNorm(config.d_model)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        attended, present = self.attn(self.ln_1(x), mask, past)
        x = x + attended
        x = x + self.mlp(self.ln_2(x))
        return x, present


class GPT(nn.Module):
    """Decoder-only transformer. `forward(input_ids)` returns logits [batch, seq, vocab]."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.max_seq, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        for name, param in self.named_parameters():
            if name.endswith("out_proj.weight") or name.endswith("fc_out.weight"):
                nn.init.normal_(param, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Logits for `input_ids`; with `past_key_values` also the updated cache.

        `attention_mask` [batch, past + seq] marks real tokens (1) and left padding (0).
        """
        batch, seq = input_ids.shape
        past_len = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + seq, device=input_ids.device).expand(batch, seq)
        x = self.tok_emb(input_ids) + self.pos_emb(position_ids)
        mask = self._mask(batch, seq, past_len, attention_mask, input_ids.device)
        presents = []
        for i, block in enumerate(self.blocks):
            x, present = block(x, mask, None if past_key_values is None else past_key_values[i])
            presents.append(present)
        logits = self.lm_head(self.ln_f(x))
        return logits if past_key_values is None else (logits, presents)

    @staticmethod
    def _mask(
        batch: int, seq: int, past_len: int, attention_mask: torch.Tensor | None, device: torch.device
    ) -> torch.Tensor:
        """Boolean [batch, 1, seq, past + seq] mask: causal, and blind to padded keys."""
        total = past_len + seq
        query_pos = torch.arange(past_len, total, device=device).unsqueeze(1)
        key_pos = torch.arange(total, device=device).unsqueeze(0)
        mask = (key_pos <= query_pos).unsqueeze(0).unsqueeze(0).expand(batch, 1, seq, total)
        if attention_mask is not None:
            mask = mask & attention_mask.bool()[:, None, None, :]
            # A fully padded query row would be all False: let it see itself to avoid NaNs.
            mask = mask | (key_pos == query_pos)
        return mask


def gpt(
    vocab_size: int = 256,
    n_layer: int = 4,
    n_head: int = 4,
    d_model: int = 128,
    max_seq: int = 256,
    checkpoint: str | None = None,
    n_kv_head: int | None = None,
) -> GPT:
    """Factory named by example plans: `factory("examples.models.gpt:gpt", n_layer = 4)`.

    `checkpoint` loads trained weights (a state dict saved by a planc training program); a
    relative path is read from the folder of the example plans (`examples/`), as plans read
    theirs, wherever the compiler or the training program runs. `n_kv_head` < `n_head` builds
    grouped-query attention (it must divide `n_head`).
    """
    if n_kv_head is not None and (n_kv_head < 1 or n_head % n_kv_head):
        raise ValueError(f"n_kv_head = {n_kv_head} must divide n_head = {n_head}")
    model = GPT(GPTConfig(vocab_size, n_layer, n_head, d_model, max_seq, n_kv_head=n_kv_head))
    if checkpoint is not None:
        path = Path(checkpoint) if Path(checkpoint).is_absolute() else Path(__file__).resolve().parents[1] / checkpoint
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {checkpoint} not found (looked for {path})")
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()
