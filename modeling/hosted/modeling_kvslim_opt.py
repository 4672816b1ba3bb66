"""OPT with grouped-query or multi-head latent attention, as written by kvslim.

Transformers' OPT ignores `num_key_value_heads`, so an OPT converted to GQA/MQA needs this class:
OPT whose `k_proj`/`v_proj` produce `num_key_value_heads` heads, each read by its group of query
heads. With `kv_lora_rank` set there are no k/v projections: keys and values come from a cached
latent (kvslim_attention.py). Everything else is OPT (learned positions, biases, norms).

This file and kvslim_attention.py need only torch and transformers: they are saved next to
converted checkpoints (`auto_map`), so those load with `trust_remote_code=True` without kvslim.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from transformers import OPTConfig, OPTForCausalLM, OPTModel
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.opt.modeling_opt import OPTAttention

from .kvslim_attention import LatentKV, cache_latent, eager_gqa_attention, of_layer, set_key_value_heads, takes_cache

# OPT's own eager attention takes the softmax in float32
eager_attention = partial(eager_gqa_attention, softmax_dtype=torch.float32)


class KvslimOPTConfig(OPTConfig):
    model_type = "kvslim_opt"

    def __init__(self, num_key_value_heads: int | None = None, kv_lora_rank: int | None = None, **kwargs):
        super().__init__(**kwargs)
        set_key_value_heads(self, num_key_value_heads)
        self.kv_lora_rank = kv_lora_rank


class KvslimOPTAttention(OPTAttention):
    """OPT self-attention with `num_key_value_heads` KV heads."""

    def __init__(self, config: KvslimOPTConfig, layer_idx: int | None = None):
        super().__init__(config, layer_idx=layer_idx)
        if config.kv_lora_rank:
            del self.k_proj, self.v_proj
            self.num_key_value_groups = 1
            self.latent = LatentKV(self.embed_dim, self.num_heads, self.head_dim, of_layer(config.kv_lora_rank, layer_idx))
            return
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads  # SDPA's native GQA
        kv = self.num_key_value_heads * self.head_dim
        self.k_proj = nn.Linear(self.embed_dim, kv, bias=self.enable_bias)
        self.v_proj = nn.Linear(self.embed_dim, kv, bias=self.enable_bias)

    @takes_cache
    def forward(self, hidden_states, cache=None, attention_mask=None, output_attentions=False, **kwargs):
        bsz, length, _ = hidden_states.shape
        query = (self.q_proj(hidden_states) * self.scaling).view(bsz, length, -1, self.head_dim).transpose(1, 2)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention)
        dropout = self.dropout if self.training else 0.0
        if self.config.kv_lora_rank:
            latent = cache_latent(cache, self.latent.latent(hidden_states), self.layer_idx)
            absorb = cache is not None and length == 1 and not self.training
            out = self.latent.attend(self, query, latent, attention_mask, 1.0, dropout, attention, absorb)
            return self.out_proj(out.reshape(bsz, length, -1).contiguous()), None
        key = self.k_proj(hidden_states).view(bsz, length, -1, self.head_dim).transpose(1, 2)
        value = self.v_proj(hidden_states).view(bsz, length, -1, self.head_dim).transpose(1, 2)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        out, weights = attention(self, query, key, value, attention_mask, dropout=dropout, scaling=1.0, **kwargs)
        return self.out_proj(out.reshape(bsz, length, -1).contiguous()), weights


def _use_gqa_attention(layers: nn.ModuleList, config: KvslimOPTConfig) -> None:
    for i, layer in enumerate(layers):
        layer.self_attn = KvslimOPTAttention(config, layer_idx=i)


class KvslimOPTModel(OPTModel):
    config_class = KvslimOPTConfig

    def __init__(self, config: KvslimOPTConfig):
        super().__init__(config)
        _use_gqa_attention(self.decoder.layers, config)
        self.post_init()


class KvslimOPTForCausalLM(OPTForCausalLM):
    config_class = KvslimOPTConfig

    def __init__(self, config: KvslimOPTConfig):
        super().__init__(config)
        _use_gqa_attention(self.model.decoder.layers, config)
        self.post_init()


KvslimOPTConfig.register_for_auto_class()
KvslimOPTModel.register_for_auto_class("AutoModel")
KvslimOPTForCausalLM.register_for_auto_class("AutoModelForCausalLM")
