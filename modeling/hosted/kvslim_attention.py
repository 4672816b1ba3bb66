"""Attention pieces shared by the model classes kvslim hosts (GPT-2, OPT, GPT-NeoX, BERT, RoBERTa).

Self-contained (torch only) and copied next to every hosted checkpoint with its modeling file.

* Grouped-query attention: `eager_gqa_attention` is the reference implementation for any KV head
  count (each KV head serves its group of query heads); under SDPA the hosted classes use
  Transformers' native GQA instead.
* Multi-head latent attention (no RoPE: GPT-2, OPT, BERT): keys and values of all heads come from
  one low-rank latent per token, c = kv_a_proj(x) (rank r), through kv_b_proj (per head
  [k_h; v_h], DeepSeek's layout). The cache holds only c: r numbers per token and layer instead of
  2 * heads * head_dim. Prefill expands c into keys and values and runs the model's attention
  function; single-token decode never expands the cache: the key up-projection folds into the
  query and the value up-projection into the output,

      scores_h = (q_h W_uk,h) . c        out_h = W_uv,h (softmax(scores_h) . c)

  so decoding is MQA with one r-dim KV head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def set_key_value_heads(config, num_key_value_heads: int | None) -> None:
    """`num_key_value_heads` on a hosted config (default: one per query head), checked."""
    config.num_key_value_heads = num_key_value_heads or config.num_attention_heads
    if config.num_attention_heads % config.num_key_value_heads:
        raise ValueError(f"num_key_value_heads ({config.num_key_value_heads}) must divide "
                         f"num_attention_heads ({config.num_attention_heads}).")


def eager_gqa_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                        softmax_dtype=None, **kwargs):
    """Reference attention for any KV head count: each KV head serves its group of query heads.
    `softmax_dtype`: float32 where the parent class's eager attention upcasts (OPT, GPT-NeoX)."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    weights = torch.matmul(query, key.transpose(2, 3)) * (query.shape[-1] ** -0.5 if scaling is None else scaling)
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = F.softmax(weights, dim=-1, dtype=softmax_dtype).to(value.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class LatentKV(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, rank: int):
        super().__init__()
        self.num_heads, self.head_dim, self.rank = num_heads, head_dim, rank
        self.kv_a_proj = nn.Linear(hidden_size, rank, bias=True)
        self.kv_b_proj = nn.Linear(rank, num_heads * 2 * head_dim, bias=False)

    def latent(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, T, hidden) -> (B, 1, T, r): what the cache stores (as a one-head key)."""
        return self.kv_a_proj(hidden_states)[:, None]

    def attend(self, module, query, latent, attention_mask, scaling, dropout, attention, absorb: bool):
        """query (B, H, Q, hd), latent (B, 1, K, r) -> attention output (B, Q, H, hd)."""
        if absorb:
            w = self.kv_b_proj.weight.view(self.num_heads, 2 * self.head_dim, self.rank)
            w_uk, w_uv = w[:, : self.head_dim], w[:, self.head_dim:]
            q_latent = torch.einsum("bhqd,hdr->bhqr", query, w_uk)
            mask = None if attention_mask is None else attention_mask[..., : latent.shape[2]]
            out = F.scaled_dot_product_attention(q_latent, latent, latent, attn_mask=mask, dropout_p=dropout,
                                                 scale=scaling, enable_gqa=True)  # one KV head, never expanded
            return torch.einsum("bhqr,hvr->bqhv", out, w_uv)
        b, _, length, _ = latent.shape
        kv = self.kv_b_proj(latent[:, 0]).view(b, length, self.num_heads, 2 * self.head_dim).transpose(1, 2)
        key, value = kv.split(self.head_dim, dim=-1)
        out, _ = attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling)
        return out


def cache_latent(past_key_values, latent: torch.Tensor, layer_idx: int) -> torch.Tensor:
    """Append this step's latent to the cache (stored as keys; values hold nothing) and return all."""
    if past_key_values is None:
        return latent
    latent, _ = past_key_values.update(latent, latent[..., :0], layer_idx)
    return latent
