"""Mixture-of-experts models with multi-head latent attention, as written by kvslim.

Mixtral, Qwen2-MoE and Qwen3-MoE route tokens with a softmax over experts (and Qwen2-MoE adds a gated
shared expert), which DeepseekV3's sigmoid router with group-limited top-k cannot reproduce, so an
MLA conversion keeps the source's class and swaps its attention for kvslim's
`LatentRopeAttention` (kvslim_attention.py): a cached latent plus one shared RoPE key (and, for
Qwen3-MoE's per-head key norm, one key-norm gain per source KV head). Routers and experts are the
source's, stored as the source stores them: each config registers the source's checkpoint
conversion rules (one tensor per expert on disk, fused in the module) under its own model type.

This file and kvslim_attention.py need only torch and transformers: they are saved next to
converted checkpoints (`auto_map`), so those load with `trust_remote_code=True` without kvslim.
"""

from __future__ import annotations

from transformers import (
    MixtralConfig,
    MixtralForCausalLM,
    MixtralModel,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen2MoeModel,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    Qwen3MoeModel,
)
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping

from .kvslim_attention import latent_rope_config, use_latent_rope_attention


class KvslimMixtralConfig(latent_rope_config(MixtralConfig)):
    model_type = "kvslim_mixtral"


class KvslimMixtralModel(MixtralModel):
    config_class = KvslimMixtralConfig

    def __init__(self, config: KvslimMixtralConfig):
        super().__init__(config)
        use_latent_rope_attention(self.layers, config)
        self.post_init()


class KvslimMixtralForCausalLM(MixtralForCausalLM):
    config_class = KvslimMixtralConfig

    def __init__(self, config: KvslimMixtralConfig):
        super().__init__(config)
        use_latent_rope_attention(self.model.layers, config)
        self.post_init()


class KvslimQwen2MoeConfig(latent_rope_config(Qwen2MoeConfig)):
    model_type = "kvslim_qwen2_moe"


class KvslimQwen2MoeModel(Qwen2MoeModel):
    config_class = KvslimQwen2MoeConfig

    def __init__(self, config: KvslimQwen2MoeConfig):
        super().__init__(config)
        use_latent_rope_attention(self.layers, config)
        self.post_init()


class KvslimQwen2MoeForCausalLM(Qwen2MoeForCausalLM):
    config_class = KvslimQwen2MoeConfig

    def __init__(self, config: KvslimQwen2MoeConfig):
        super().__init__(config)
        use_latent_rope_attention(self.model.layers, config)
        self.post_init()


class KvslimQwen3MoeConfig(latent_rope_config(Qwen3MoeConfig)):
    model_type = "kvslim_qwen3_moe"
    latent_key_norm = True  # the cache holds one key-norm gain per KV head and token


class KvslimQwen3MoeModel(Qwen3MoeModel):
    config_class = KvslimQwen3MoeConfig

    def __init__(self, config: KvslimQwen3MoeConfig):
        super().__init__(config)
        use_latent_rope_attention(self.layers, config)
        self.post_init()


class KvslimQwen3MoeForCausalLM(Qwen3MoeForCausalLM):
    config_class = KvslimQwen3MoeConfig

    def __init__(self, config: KvslimQwen3MoeConfig):
        super().__init__(config)
        use_latent_rope_attention(self.model.layers, config)
        self.post_init()


for _source, _config, _model, _causal in (
        ("mixtral", KvslimMixtralConfig, KvslimMixtralModel, KvslimMixtralForCausalLM),
        ("qwen2_moe", KvslimQwen2MoeConfig, KvslimQwen2MoeModel, KvslimQwen2MoeForCausalLM),
        ("qwen3_moe", KvslimQwen3MoeConfig, KvslimQwen3MoeModel, KvslimQwen3MoeForCausalLM)):
    _rules = get_checkpoint_conversion_mapping(_source)
    if _rules is not None:  # one tensor per expert on disk -> the fused expert modules
        register_checkpoint_conversion_mapping(_config.model_type, _rules, overwrite=True)
    _config.register_for_auto_class()
    _model.register_for_auto_class("AutoModel")
    _causal.register_for_auto_class("AutoModelForCausalLM")
