"""GPT-NeoX (Pythia) with grouped-query attention, as written by kvslim.

Transformers' GPT-NeoX ignores `num_key_value_heads`, so a Pythia converted to GQA/MQA needs this
class. Its fused `query_key_value` holds all query heads, then the `num_key_value_heads` key heads,
then the value heads (the source interleaves q/k/v per head; with fewer KV heads there is nothing to
interleave). With `kv_lora_rank` set, attention is kvslim's multi-head latent attention with a
shared RoPE key at some of the rotary pairs (kvslim_attention.py). Partial rotary embeddings,
parallel residual and everything else are GPT-NeoX.

This file and kvslim_attention.py need only torch and transformers: they are saved next to
converted checkpoints (`auto_map`), so those load with `trust_remote_code=True` without kvslim.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, GPTNeoXModel
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXAttention, apply_rotary_pos_emb

from .kvslim_attention import eager_gqa_attention, set_key_value_heads, takes_cache, use_latent_rope_attention

# GPT-NeoX's own eager attention takes the softmax in float32
eager_attention = partial(eager_gqa_attention, softmax_dtype=torch.float32)


class KvslimGPTNeoXConfig(GPTNeoXConfig):
    model_type = "kvslim_gpt_neox"

    def __init__(self, num_key_value_heads: int | None = None, kv_lora_rank: int | None = None,
                 qk_rope_head_dim: int | None = None, **kwargs):
        super().__init__(**kwargs)
        set_key_value_heads(self, num_key_value_heads)
        self.kv_lora_rank, self.qk_rope_head_dim = kv_lora_rank, qk_rope_head_dim


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

    @takes_cache
    def forward(self, hidden_states, attention_mask=None, cache=None, position_embeddings=None, **kwargs):
        shape = (*hidden_states.shape[:-1], -1, self.head_size)
        query, key, value = (t.view(shape).transpose(1, 2)
                             for t in self.query_key_value(hidden_states).split(self.split_size, dim=-1))
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention)
        out, weights = attention(self, query, key, value, attention_mask, scaling=self.scaling,
                                 dropout=self.attention_dropout if self.training else 0.0, **kwargs)
        return self.dense(out.reshape(*hidden_states.shape[:-1], -1).contiguous()), weights


def _use_gqa_attention(layers: nn.ModuleList, config: KvslimGPTNeoXConfig) -> None:
    if config.kv_lora_rank:  # multi-head latent attention with a shared RoPE key
        use_latent_rope_attention(layers, config, attribute="attention")
        return
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
