"""GPT-2 with grouped-query or multi-head latent attention, as written by kvslim.

Transformers' GPT-2 ignores `num_key_value_heads`, so a GPT-2 converted to GQA/MQA needs this class:
GPT-2 with a narrower fused `c_attn` (query heads, then `num_key_value_heads` key and value heads)
and attention that reads each KV head from its query group. With `kv_lora_rank` set, `c_attn`
computes only queries and keys/values come from a cached latent (kvslim_attention.py).
Everything else is GPT-2.

This file and kvslim_attention.py need only torch and transformers: they are saved next to
converted checkpoints (`auto_map`), so those load with `trust_remote_code=True` without kvslim.
"""

from __future__ import annotations

from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model
from transformers.cache_utils import EncoderDecoderCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention
from transformers.pytorch_utils import Conv1D

from .kvslim_attention import LatentKV, cache_latent, eager_gqa_attention, of_layer, set_key_value_heads, takes_cache


class KvslimGPT2Config(GPT2Config):
    model_type = "kvslim_gpt2"

    def __init__(self, num_key_value_heads: int | None = None, kv_lora_rank: int | None = None, **kwargs):
        super().__init__(**kwargs)
        set_key_value_heads(self, num_key_value_heads)
        self.kv_lora_rank = kv_lora_rank
        if self.add_cross_attention:
            raise ValueError("kvslim's GPT-2 has no cross-attention.")


class KvslimGPT2Attention(GPT2Attention):
    """GPT-2 self-attention with `num_key_value_heads` KV heads, or a latent KV (`kv_lora_rank`)."""

    def __init__(self, config: KvslimGPT2Config, layer_idx: int | None = None):
        super().__init__(config, is_cross_attention=False, layer_idx=layer_idx)
        if config.kv_lora_rank:
            self.num_key_value_groups = 1  # keys/values are expanded per head from the latent
            self.split_size = [self.embed_dim]
            self.c_attn = Conv1D(self.embed_dim, self.embed_dim)
            self.latent = LatentKV(self.embed_dim, self.num_heads, self.head_dim, of_layer(config.kv_lora_rank, layer_idx))
            return
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads  # read by SDPA for native GQA
        kv = self.num_key_value_heads * self.head_dim
        self.split_size = [self.embed_dim, kv, kv]
        self.c_attn = Conv1D(self.embed_dim + 2 * kv, self.embed_dim)

    @takes_cache
    def forward(self, hidden_states, cache=None, attention_mask=None, **kwargs):
        kwargs.pop("encoder_hidden_states", None)
        kwargs.pop("encoder_attention_mask", None)
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        cache = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_gqa_attention)
        dropout = self.attn_dropout.p if self.training else 0.0
        if self.config.kv_lora_rank:
            query = self.c_attn(hidden_states).view(shape).transpose(1, 2)
            latent = cache_latent(cache, self.latent.latent(hidden_states), self.layer_idx)
            absorb = cache is not None and query.shape[2] == 1 and not self.training
            out = self.latent.attend(self, query, latent, attention_mask, self.scaling, dropout, attention, absorb)
            out = out.reshape(*out.shape[:-2], -1).contiguous()
            return self.resid_dropout(self.c_proj(out)), None
        query, key, value = (t.view(shape).transpose(1, 2) for t in self.c_attn(hidden_states).split(self.split_size, dim=2))
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        out, weights = attention(self, query, key, value, attention_mask, dropout=dropout, scaling=self.scaling, **kwargs)
        out = out.reshape(*out.shape[:-2], -1).contiguous()
        return self.resid_dropout(self.c_proj(out)), weights


def _use_gqa_attention(blocks: nn.ModuleList, config: KvslimGPT2Config) -> None:
    for i, block in enumerate(blocks):
        block.attn = KvslimGPT2Attention(config, layer_idx=i)


class KvslimGPT2Model(GPT2Model):
    config_class = KvslimGPT2Config

    def __init__(self, config: KvslimGPT2Config):
        super().__init__(config)
        _use_gqa_attention(self.h, config)
        self.post_init()


class KvslimGPT2LMHeadModel(GPT2LMHeadModel):
    config_class = KvslimGPT2Config

    def __init__(self, config: KvslimGPT2Config):
        super().__init__(config)
        _use_gqa_attention(self.transformer.h, config)
        self.post_init()


KvslimGPT2Config.register_for_auto_class()
KvslimGPT2Model.register_for_auto_class("AutoModel")
KvslimGPT2LMHeadModel.register_for_auto_class("AutoModelForCausalLM")
