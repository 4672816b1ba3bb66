"""Qwen3 with multi-head latent attention, as written by kvslim (`kvslim convert --to mla`).

Qwen3 RMS-normalises every query and key head before RoPE, which DeepseekV3 cannot express, so an
MLA conversion of Qwen3 keeps Qwen3 and swaps its attention for kvslim's `LatentRopeAttention`:
a cached latent, one shared RoPE key and one key-norm scale per source KV head and token
(kvslim_attention.py). Everything else is Qwen3.

This file and kvslim_attention.py need only torch and transformers: they are saved next to
converted checkpoints (`auto_map`), so those load with `trust_remote_code=True` without kvslim.
"""

from __future__ import annotations

from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

from .kvslim_attention import LatentRopeAttention


class KvslimQwen3Config(Qwen3Config):
    model_type = "kvslim_qwen3"
    latent_key_norm = True  # the cache holds one key-norm gain per KV head and token

    def __init__(self, kv_lora_rank: int = 64, qk_rope_head_dim: int = 16, **kwargs):
        super().__init__(**kwargs)
        self.kv_lora_rank, self.qk_rope_head_dim = kv_lora_rank, qk_rope_head_dim


def _use_latent_attention(layers, config: KvslimQwen3Config) -> None:
    for i, layer in enumerate(layers):
        sliding = config.layer_types[i] == "sliding_attention"
        layer.self_attn = LatentRopeAttention(
            config, i, head_dim=config.head_dim, scaling=config.head_dim**-0.5,
            num_key_value_heads=config.num_key_value_heads, attention_bias=config.attention_bias,
            output_bias=config.attention_bias, key_norm=config.latent_key_norm, norm_eps=config.rms_norm_eps,
            sliding_window=config.sliding_window if sliding else None)


class KvslimQwen3Model(Qwen3Model):
    config_class = KvslimQwen3Config

    def __init__(self, config: KvslimQwen3Config):
        super().__init__(config)
        _use_latent_attention(self.layers, config)
        self.post_init()


class KvslimQwen3ForCausalLM(Qwen3ForCausalLM):
    config_class = KvslimQwen3Config

    def __init__(self, config: KvslimQwen3Config):
        super().__init__(config)
        _use_latent_attention(self.model.layers, config)
        self.post_init()


KvslimQwen3Config.register_for_auto_class()
KvslimQwen3Model.register_for_auto_class("AutoModel")
KvslimQwen3ForCausalLM.register_for_auto_class("AutoModelForCausalLM")
