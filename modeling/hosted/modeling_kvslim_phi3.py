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

from .kvslim_attention import latent_rope_config, use_latent_rope_attention


class KvslimPhi3Config(latent_rope_config(Phi3Config)):
    model_type = "kvslim_phi3"


class KvslimPhi3Model(Phi3Model):
    config_class = KvslimPhi3Config

    def __init__(self, config: KvslimPhi3Config):
        super().__init__(config)
        use_latent_rope_attention(self.layers, config)
        self.post_init()


class KvslimPhi3ForCausalLM(Phi3ForCausalLM):
    config_class = KvslimPhi3Config

    def __init__(self, config: KvslimPhi3Config):
        super().__init__(config)
        use_latent_rope_attention(self.model.layers, config)
        self.post_init()


KvslimPhi3Config.register_for_auto_class()
KvslimPhi3Model.register_for_auto_class("AutoModel")
KvslimPhi3ForCausalLM.register_for_auto_class("AutoModelForCausalLM")
