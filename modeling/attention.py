"""kvslim attention for converted models: GQA without repeated K/V, and absorbed MLA decoding.

* ``kvslim_sdpa``: an attention function registered with Transformers' ``AttentionInterface`` (and
  its mask with ``AttentionMaskInterface``, without which masks arrive as None). It calls
  ``scaled_dot_product_attention(..., enable_gqa=True)``, so grouped K/V are never repeated in
  memory. Select it with ``attn_implementation="kvslim_sdpa"`` or :func:`enable`.
* :class:`AbsorbedMLAAttention`: DeepseekV3's attention with the same parameters and the same
  latent-only cache (the normalised latent c and the shared RoPE key), but at decode it never
  expands the cache. The key up-projection folds into the query and the value up-projection into
  the output, so attention runs in latent space as MQA with one KV head::

      scores = (q_nope W_uk) . c  +  rope(q_rope) . rope(k_rope)
      out_h  = W_uv,h (softmax(scores) . c)

  Prefill keeps the expanded path (one matmul over the prompt is cheaper there).

:func:`enable` switches a loaded model to these (explicit module replacement for MLA layers, the
registered function for the others) and :func:`disable` restores exactly what was there before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .hosted.kvslim_attention import latent_attention, takes_cache

IMPLEMENTATION = "kvslim_sdpa"
_ORIGINALS = "_kvslim_originals"


PACK_MAX_ROWS = 256  # pack a group's query heads into one KV head's query axis up to this many rows


def kvslim_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                          scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """(B, H, Q, D) x (B, KV, K, D) attention without repeating K/V. Returns (B, Q, H, Dv), None.

    Short query blocks (decoding) pack each group's query heads into the query axis of their one KV
    head: (B, KV, G*Q, D) against (B, KV, K, D) is plain attention, exact, and never copies K/V
    (SDPA's enable_gqa can fall back to a kernel that does). Long blocks (prefill) use
    enable_gqa, where the causal flag avoids building a G*Q x K mask.
    """
    b, heads, q_len, _ = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    causal = (is_causal if is_causal is not None else getattr(module, "is_causal", True)) and q_len > 1
    mask = None if attention_mask is None else attention_mask[:, :, :, :k_len]
    if mask is None and causal and (q_len != k_len or groups > 1 and q_len * groups <= PACK_MAX_ROWS):
        # Transformers leaves the mask out where SDPA's own is_causal is right: query i sees keys
        # 0..i (top-left aligned). With a static cache the keys run on past the queries into
        # unfilled slots, which this keeps out; packed heads need the mask spelled out.
        mask = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril()[None, None]
    if groups > 1 and q_len * groups <= PACK_MAX_ROWS:
        packed = query.reshape(b, kv_heads, groups * q_len, query.shape[-1])  # heads are grouped by KV head
        if mask is not None:
            mask = mask.expand(b, -1, -1, -1)
            mask = mask.repeat(1, 1, groups, 1) if mask.shape[1] == 1 else \
                mask.reshape(b, kv_heads, groups * q_len, k_len)
        out = F.scaled_dot_product_attention(packed, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling)
        out = out.reshape(b, heads, q_len, value.shape[-1])
    else:
        v_dim = value.shape[-1]
        if v_dim < query.shape[-1] and mask is None and query.device.type == "cpu":
            # CPU's only fused kernel (flash) needs one head dim; MLA's values are narrower than
            # its keys. Zero columns leave the first v_dim outputs exact, at ~half the math path's cost.
            value = F.pad(value, (0, query.shape[-1] - v_dim))
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling,
            is_causal=causal and mask is None, enable_gqa=groups > 1,
        )[..., :v_dim]
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register ``kvslim_sdpa`` with Transformers (idempotent; done on import of kvslim.modeling)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, kvslim_sdpa_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


def _deepseek_attention_class():
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention

    return DeepseekV3Attention


def _rope(module, q_rot, k_rot, cos, sin):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
        apply_rotary_pos_emb,
        apply_rotary_pos_emb_interleave,
    )

    if module.config.rope_interleave:
        return apply_rotary_pos_emb_interleave(q_rot, k_rot, cos, sin)
    return apply_rotary_pos_emb(q_rot, k_rot, cos, sin)


class AbsorbedMLAAttention(nn.Module):
    """DeepseekV3 attention with absorbed latent-space decoding; shares the wrapped module's weights.

    `mode`: "auto" (absorbed when a step has at most `absorb_max_queries` queries, i.e. decode),
    "absorbed" or "expanded" (always).
    """

    def __init__(self, base: nn.Module, mode: str = "auto", absorb_max_queries: int = 1):
        super().__init__()
        if mode not in ("auto", "absorbed", "expanded"):
            raise ValueError("mode must be auto, absorbed or expanded")
        self.config, self.layer_idx = base.config, base.layer_idx
        self.num_heads, self.scaling = base.num_heads, base.scaling
        self.q_lora_rank, self.kv_lora_rank = base.q_lora_rank, base.kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim = base.qk_nope_head_dim, base.qk_rope_head_dim
        self.v_head_dim, self.qk_head_dim = base.v_head_dim, base.qk_head_dim
        self.num_key_value_groups, self.attention_dropout = base.num_key_value_groups, base.attention_dropout
        self.is_causal = True
        # the same parameter objects: state_dict keys and values are unchanged
        for name in ("q_proj", "q_a_proj", "q_a_layernorm", "q_b_proj", "kv_a_proj_with_mqa",
                     "kv_a_layernorm", "kv_b_proj", "o_proj"):
            setattr(self, name, getattr(base, name))
        self.mode, self.absorb_max_queries = mode, absorb_max_queries

    @takes_cache
    def forward(self, hidden_states, position_embeddings, attention_mask, cache=None, **kwargs):
        b, q_len = hidden_states.shape[:-1]
        if self.q_lora_rank is None:
            q = self.q_proj(hidden_states)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
        q = q.view(b, q_len, -1, self.qk_head_dim).transpose(1, 2)
        q_nope, q_rot = torch.split(q, [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        latent, k_rot = torch.split(self.kv_a_proj_with_mqa(hidden_states), [self.kv_lora_rank, self.qk_rope_head_dim], -1)
        latent = self.kv_a_layernorm(latent).view(b, 1, q_len, self.kv_lora_rank)
        k_rot = k_rot.view(b, 1, q_len, self.qk_rope_head_dim)
        cos, sin = position_embeddings
        q_rot, k_rot = _rope(self, q_rot, k_rot, cos, sin)
        if cache is not None:  # the cache holds only the latent and the RoPE key
            latent, k_rot = cache.update(latent, k_rot, self.layer_idx)

        absorbed = self.mode == "absorbed" or (self.mode == "auto" and q_len <= self.absorb_max_queries)
        dropout = self.attention_dropout if self.training else 0.0
        if absorbed:
            w = self.kv_b_proj.weight.view(self.num_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
            w_uk, w_uv = w[:, : self.qk_nope_head_dim], w[:, self.qk_nope_head_dim:]
            q_latent = torch.einsum("bhqd,hdr->bhqr", q_nope, w_uk)
            context = latent_attention(q_latent, latent[:, 0], q_rot, k_rot[:, 0], scaling=self.scaling,
                                       attention_mask=attention_mask, dropout=dropout, training=self.training)
            out = torch.einsum("bhqr,hvr->bqhv", context, w_uv)
        else:
            kv = self.kv_b_proj(latent).view(b, latent.shape[2], -1, self.qk_nope_head_dim + self.v_head_dim)
            k_nope, value = torch.split(kv.transpose(1, 2), [self.qk_nope_head_dim, self.v_head_dim], dim=-1)
            key = torch.cat([k_nope, k_rot.expand(-1, self.num_heads, -1, -1)], dim=-1)
            query = torch.cat([q_nope, q_rot], dim=-1)
            out, _ = kvslim_sdpa_attention(self, query, key, value, attention_mask, dropout, self.scaling)
        return self.o_proj(out.reshape(b, q_len, -1)), None


BACKENDS = ("sdpa", "flash", "flex", "auto")


def choose_backend(backend: str, device: torch.device | None = None) -> str:
    """The attention implementation for `backend`, falling back to kvslim_sdpa (with a one-line
    notice) when a kernel is not installed or cannot run on this device."""
    import importlib.util
    import logging

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    on_cuda = device is not None and device.type == "cuda"
    if backend in ("flash", "auto"):
        if importlib.util.find_spec("flash_attn") is not None and on_cuda:
            return "flash_attention_2"
        if backend == "flash":
            logging.getLogger("kvslim").warning(
                "kvslim: FlashAttention needs the flash-attn package and a CUDA GPU; using kvslim_sdpa instead.")
    if backend == "flex":
        try:
            from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
        except ImportError:
            logging.getLogger("kvslim").warning("kvslim: FlexAttention needs torch>=2.5; using kvslim_sdpa instead.")
        else:
            if on_cuda:
                return "flex_attention"
            logging.getLogger("kvslim").warning(
                "kvslim: FlexAttention is compiled for GPUs here; on this device using kvslim_sdpa instead.")
    return IMPLEMENTATION


def enable(model: nn.Module, mla_mode: str = "auto", backend: str = "sdpa") -> nn.Module:
    """Switch a loaded model to kvslim attention; reversible with :func:`disable`.

    MLA layers get the absorbed attention; the rest get `backend` (sdpa: kvslim_sdpa; flash /
    flex: Transformers' FlashAttention-2 / FlexAttention where installed and usable, else
    kvslim_sdpa with a notice; auto: flash when possible).
    """
    register()
    if getattr(model, _ORIGINALS, None) is not None:
        return model
    device = next(model.parameters()).device
    implementation = choose_backend(backend, device)
    originals = {"attn_implementation": model.config._attn_implementation, "modules": {}}
    mla_class = _deepseek_attention_class()
    for name, module in list(model.named_modules()):
        if type(module) is mla_class:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            originals["modules"][name] = module
            setattr(parent, child, AbsorbedMLAAttention(module, mode=mla_mode))
    model.set_attn_implementation(implementation)
    object.__setattr__(model, _ORIGINALS, originals)  # plain attribute: not a submodule, not saved
    return model


def disable(model: nn.Module) -> nn.Module:
    """Undo :func:`enable`: the original attention modules and implementation come back."""
    originals = getattr(model, _ORIGINALS, None)
    if originals is None:
        return model
    for name, module in originals["modules"].items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, module)
    model.set_attn_implementation(originals["attn_implementation"])
    object.__setattr__(model, _ORIGINALS, None)
    return model
