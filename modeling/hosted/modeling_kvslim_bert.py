"""BERT and RoBERTa with grouped-query or multi-head latent attention, as written by kvslim.

Transformers' BERT and RoBERTa ignore `num_key_value_heads`, so an encoder converted to GQA/MQA needs this
class: BERT whose `key`/`value` projections produce `num_key_value_heads` heads, each read by its
group of query heads. With `kv_lora_rank` set, keys and values come from one low-rank latent per
token (kvslim_attention.py). Attention stays bidirectional; everything else is BERT.

This file and kvslim_attention.py need only torch and transformers: they are saved next to
converted checkpoints (`auto_map`), so those load with `trust_remote_code=True` without kvslim.
"""

from __future__ import annotations

from torch import nn
from transformers import BertConfig, BertModel, RobertaConfig, RobertaModel
from transformers.cache_utils import EncoderDecoderCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.bert.modeling_bert import BertSelfAttention

from .kvslim_attention import LatentKV, cache_latent, eager_gqa_attention, of_layer, set_key_value_heads, takes_cache


class KvslimBertConfig(BertConfig):
    model_type = "kvslim_bert"

    def __init__(self, num_key_value_heads: int | None = None, kv_lora_rank: int | None = None, **kwargs):
        super().__init__(**kwargs)
        set_key_value_heads(self, num_key_value_heads)
        self.kv_lora_rank = kv_lora_rank


class KvslimRobertaConfig(RobertaConfig):
    model_type = "kvslim_roberta"

    def __init__(self, num_key_value_heads: int | None = None, kv_lora_rank: int | None = None, **kwargs):
        super().__init__(**kwargs)
        set_key_value_heads(self, num_key_value_heads)
        self.kv_lora_rank = kv_lora_rank


class KvslimBertSelfAttention(BertSelfAttention):
    """BERT/RoBERTa self-attention (the two are identical) with `num_key_value_heads` KV heads or a latent KV."""

    def __init__(self, config: KvslimBertConfig, is_causal: bool = False, layer_idx: int | None = None):
        super().__init__(config, is_causal=is_causal, layer_idx=layer_idx)
        if config.kv_lora_rank:
            del self.key, self.value
            self.num_key_value_groups = 1
            self.latent = LatentKV(config.hidden_size, self.num_attention_heads, self.attention_head_size,
                                   of_layer(config.kv_lora_rank, layer_idx))
            return
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_attention_heads // self.num_key_value_heads  # SDPA's native GQA
        kv = self.num_key_value_heads * self.attention_head_size
        self.key = nn.Linear(config.hidden_size, kv)
        self.value = nn.Linear(config.hidden_size, kv)

    @takes_cache
    def forward(self, hidden_states, attention_mask=None, cache=None, **kwargs):
        shape = (*hidden_states.shape[:-1], -1, self.attention_head_size)
        query = self.query(hidden_states).view(shape).transpose(1, 2)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_gqa_attention)
        dropout = self.dropout.p if self.training else 0.0
        if self.config.kv_lora_rank:
            latent = cache_latent(cache, self.latent.latent(hidden_states), self.layer_idx)
            absorb = cache is not None and query.shape[2] == 1 and not self.training
            out = self.latent.attend(self, query, latent, attention_mask, self.scaling, dropout, attention, absorb)
            return out.reshape(*hidden_states.shape[:-1], -1).contiguous(), None
        key = self.key(hidden_states).view(shape).transpose(1, 2)
        value = self.value(hidden_states).view(shape).transpose(1, 2)
        if cache is not None:
            cache = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
            key, value = cache.update(key, value, self.layer_idx)
        out, weights = attention(self, query, key, value, attention_mask, dropout=dropout, scaling=self.scaling, **kwargs)
        return out.reshape(*hidden_states.shape[:-1], -1).contiguous(), weights


def _use_kvslim_attention(layers: nn.ModuleList, config) -> None:
    for i, layer in enumerate(layers):
        layer.attention.self = KvslimBertSelfAttention(config, is_causal=config.is_decoder, layer_idx=i)


class KvslimBertModel(BertModel):
    config_class = KvslimBertConfig

    def __init__(self, config: KvslimBertConfig, add_pooling_layer: bool = True):
        super().__init__(config, add_pooling_layer=add_pooling_layer)
        _use_kvslim_attention(self.encoder.layer, config)
        self.post_init()


class KvslimRobertaModel(RobertaModel):
    config_class = KvslimRobertaConfig

    def __init__(self, config: KvslimRobertaConfig, add_pooling_layer: bool = True):
        super().__init__(config, add_pooling_layer=add_pooling_layer)
        _use_kvslim_attention(self.encoder.layer, config)
        self.post_init()


KvslimBertConfig.register_for_auto_class()
KvslimBertModel.register_for_auto_class("AutoModel")
KvslimRobertaConfig.register_for_auto_class()
KvslimRobertaModel.register_for_auto_class("AutoModel")
