"""Phi-3 with partial rotary and multi-head latent attention, as written by kvslim.

A Phi-3 whose RoPE covers the whole head becomes DeepseekV3; with `partial_rotary_factor` < 1 the
un-rotated dims have no place in DeepseekV3's layout, so the MLA conversion keeps Phi-3 and swaps
its attention for kvslim's `LatentRopeAttention` (kvslim_attention.py): a cached latent plus one
shared RoPE key at some of the rotary pairs; the free dims live in the latent. Everything else
(fused `gate_up_proj` MLP, norms) is Phi-3.

This file and kvslim_attention.py need only torch and transformers: they are saved next to
converted checkpoints (`auto_map`), so those load with `trust_remote_code=True` without kvslim.
"""

from __future__ import annotations

from transformers import Phi3Config, Phi3ForCausalLM, Phi3Model

from .kvslim_attention import LatentRopeAttention


class KvslimPhi3Config(Phi3Config):
    model_type = "kvslim_phi3"

    def __init__(self, kv_lora_rank: int = 64, qk_rope_head_dim: int = 16, **kwargs):
        super().__init__(**kwargs)
        self.kv_lora_rank, self.qk_rope_head_dim = kv_lora_rank, qk_rope_head_dim


def _use_latent_attention(layers, config: KvslimPhi3Config) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    for i, layer in enumerate(layers):
        layer.self_attn = LatentRopeAttention(
            config, i, head_dim=head_dim, scaling=head_dim**-0.5, num_key_value_heads=config.num_key_value_heads,
            sliding_window=getattr(config, "sliding_window", None))


class KvslimPhi3Model(Phi3Model):
    config_class = KvslimPhi3Config

    def __init__(self, config: KvslimPhi3Config):
        super().__init__(config)
        _use_latent_attention(self.layers, config)
        self.post_init()


class KvslimPhi3ForCausalLM(Phi3ForCausalLM):
    config_class = KvslimPhi3Config

    def __init__(self, config: KvslimPhi3Config):
        super().__init__(config)
        _use_latent_attention(self.model.layers, config)
        self.post_init()


KvslimPhi3Config.register_for_auto_class()
KvslimPhi3Model.register_for_auto_class("AutoModel")
KvslimPhi3ForCausalLM.register_for_auto_class("AutoModelForCausalLM")
