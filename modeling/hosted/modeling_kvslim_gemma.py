"""Gemma, Gemma 2 and Gemma 3 (text) with multi-head latent attention, as written by kvslim.

DeepseekV3 cannot express Gemma's blocks (GeGLU MLP, (1 + w) RMSNorm, scaled embeddings, Gemma 2's
logit soft-capping and sandwich norms, Gemma 3's per-head q/k norms and local/global RoPE), so an
MLA conversion keeps the Gemma class and swaps its attention for kvslim's `LatentRopeAttention`
(kvslim_attention.py): a cached latent, one shared RoPE key per layer at that layer's own RoPE
frequencies, and for Gemma 3 one key-norm scale per source KV head and token. Sliding-window layers
keep their window; everything else is Gemma.

This file and kvslim_attention.py need only torch and transformers: they are saved next to
converted checkpoints (`auto_map`), so those load with `trust_remote_code=True` without kvslim.
"""

from __future__ import annotations

from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma2Model,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    Gemma3TextModel,
    GemmaConfig,
    GemmaForCausalLM,
    GemmaModel,
)

from .kvslim_attention import latent_rope_config, use_latent_rope_attention


class KvslimGemmaConfig(latent_rope_config(GemmaConfig)):
    model_type = "kvslim_gemma"


class KvslimGemma2Config(latent_rope_config(Gemma2Config)):
    model_type = "kvslim_gemma2"


class KvslimGemma3TextConfig(latent_rope_config(Gemma3TextConfig)):
    model_type = "kvslim_gemma3_text"
    latent_key_norm = True  # Gemma 3 normalises each q/k head: the cache holds one key-norm gain per KV head


class KvslimGemmaModel(GemmaModel):
    config_class = KvslimGemmaConfig

    def __init__(self, config):
        super().__init__(config)
        use_latent_rope_attention(self.layers, config)
        self.post_init()


class KvslimGemmaForCausalLM(GemmaForCausalLM):
    config_class = KvslimGemmaConfig

    def __init__(self, config):
        super().__init__(config)
        use_latent_rope_attention(self.model.layers, config)
        self.post_init()


class KvslimGemma2Model(Gemma2Model):
    config_class = KvslimGemma2Config

    def __init__(self, config):
        super().__init__(config)
        use_latent_rope_attention(self.layers, config)
        self.post_init()


class KvslimGemma2ForCausalLM(Gemma2ForCausalLM):
    config_class = KvslimGemma2Config

    def __init__(self, config):
        super().__init__(config)
        use_latent_rope_attention(self.model.layers, config)
        self.post_init()


class KvslimGemma3TextModel(Gemma3TextModel):
    config_class = KvslimGemma3TextConfig

    def __init__(self, config):
        super().__init__(config)
        use_latent_rope_attention(self.layers, config)
        self.post_init()


class KvslimGemma3ForCausalLM(Gemma3ForCausalLM):
    config_class = KvslimGemma3TextConfig

    def __init__(self, config):
        super().__init__(config)
        use_latent_rope_attention(self.model.layers, config)
        self.post_init()


for _config, _model, _causal in ((KvslimGemmaConfig, KvslimGemmaModel, KvslimGemmaForCausalLM),
                                 (KvslimGemma2Config, KvslimGemma2Model, KvslimGemma2ForCausalLM),
                                 (KvslimGemma3TextConfig, KvslimGemma3TextModel, KvslimGemma3ForCausalLM)):
    _config.register_for_auto_class()
    _model.register_for_auto_class("AutoModel")
    _causal.register_for_auto_class("AutoModelForCausalLM")
