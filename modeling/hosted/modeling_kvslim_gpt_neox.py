"""GPT-NeoX (Pythia) with grouped-query attention, as written by kvslim.

Transformers' GPT-NeoX ignores `num_key_value_heads`, so a Pythia converted to GQA/MQA needs this
class. Its fused `query_key_value` holds all query heads, then the `num_key_value_heads` key heads,
then the value heads (the source interleaves q/k/v per head; with fewer KV heads there is nothing to
interleave). Partial rotary embeddings, parallel residual and everything else are GPT-NeoX.

This file is self-contained (torch + transformers only): it is saved next to converted checkpoints
(`auto_map`), so they load with `trust_remote_code=True` where kvslim is not installed.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, GPTNeoXModel
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXAttention, apply_rotary_pos_emb


class KvslimGPTNeoXConfig(GPTNeoXConfig):
    model_type = "kvslim_gpt_neox"

    def __init__(self, num_key_value_heads: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.num_key_value_heads = num_key_value_heads or self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_key_value_heads ({self.num_key_value_heads}) must divide "
                             f"num_attention_heads ({self.num_attention_heads}).")


def eager_gqa_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Reference attention for any KV head count: each KV head serves its group of query heads."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    weights = torch.matmul(query, key.transpose(2, 3)) * (query.shape[-1] ** -0.5 if scaling is None else scaling)
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class KvslimGPTNeoXAttention(GPTNeoXAttention):
    """GPT-NeoX attention with `num_key_value_heads` KV heads."""

    def __init__(self, config: KvslimGPTNeoXConfig, layer_idx: int | None = None):
        super().__init__(config, layer_idx=layer_idx)
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads  # SDPA's native GQA
        q, kv = self.num_heads * self.head_size, self.num_key_value_heads * self.head_size
        self.split_size = [q, kv, kv]
        self.query_key_value = nn.Linear(config.hidden_size, q + 2 * kv, bias=config.attention_bias)

    def forward(self, hidden_states, attention_mask=None, layer_past=None, position_embeddings=None, **kwargs):
        shape = (*hidden_states.shape[:-1], -1, self.head_size)
        query, key, value = (t.view(shape).transpose(1, 2)
                             for t in self.query_key_value(hidden_states).split(self.split_size, dim=-1))
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if layer_past is not None:
            key, value = layer_past.update(key, value, self.layer_idx)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_gqa_attention)
        out, weights = attention(self, query, key, value, attention_mask, scaling=self.scaling,
                                 dropout=self.attention_dropout if self.training else 0.0, **kwargs)
        return self.dense(out.reshape(*hidden_states.shape[:-1], -1).contiguous()), weights


def _use_gqa_attention(layers: nn.ModuleList, config: KvslimGPTNeoXConfig) -> None:
    for i, layer in enumerate(layers):
        layer.attention = KvslimGPTNeoXAttention(config, layer_idx=i)


class KvslimGPTNeoXModel(GPTNeoXModel):
    config_class = KvslimGPTNeoXConfig

    def __init__(self, config: KvslimGPTNeoXConfig):
        super().__init__(config)
        _use_gqa_attention(self.layers, config)
        self.post_init()


class KvslimGPTNeoXForCausalLM(GPTNeoXForCausalLM):
    config_class = KvslimGPTNeoXConfig

    def __init__(self, config: KvslimGPTNeoXConfig):
        super().__init__(config)
        _use_gqa_attention(self.gpt_neox.layers, config)
        self.post_init()


KvslimGPTNeoXConfig.register_for_auto_class()
KvslimGPTNeoXModel.register_for_auto_class("AutoModel")
KvslimGPTNeoXForCausalLM.register_for_auto_class("AutoModelForCausalLM")
