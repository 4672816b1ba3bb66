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

from .kvslim_attention import latent_rope_config, use_latent_rope_attention


class KvslimQwen3Config(latent_rope_config(Qwen3Config)):
    model_type = "kvslim_qwen3"
    latent_key_norm = True  # the cache holds one key-norm gain per KV head and token


class KvslimQwen3Model(Qwen3Model):
    config_class = KvslimQwen3Config

    def __init__(self, config: KvslimQwen3Config):
        super().__init__(config)
        use_latent_rope_attention(self.layers, config)
        self.post_init()


class KvslimQwen3ForCausalLM(Qwen3ForCausalLM):
    config_class = KvslimQwen3Config

    def __init__(self, config: KvslimQwen3Config):
        super().__init__(config)
        use_latent_rope_attention(self.model.layers, config)
        self.post_init()


KvslimQwen3Config.register_for_auto_class()
KvslimQwen3Model.register_for_auto_class("AutoModel")
KvslimQwen3ForCausalLM.register_for_auto_class("AutoModelForCausalLM")
