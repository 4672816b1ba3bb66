"""Attention pieces shared by the model classes kvslim hosts (GPT-2, OPT, GPT-NeoX, BERT, RoBERTa).

Self-contained (torch and transformers only) and copied next to every hosted checkpoint with its modeling file.

* Grouped-query attention: `eager_gqa_attention` is the reference implementation for any KV head
  count (each KV head serves its group of query heads); under SDPA the hosted classes use
  Transformers' native GQA instead.
* Multi-head latent attention (no RoPE: GPT-2, OPT, BERT): keys and values of all heads come from
  one low-rank latent per token, c = kv_a_proj(x) (rank r), through kv_b_proj (per head
  [k_h; v_h], DeepSeek's layout). The cache holds only c: r numbers per token and layer instead of
  2 * heads * head_dim. Prefill expands c into keys and values and runs the model's attention
  function; single-token decode never expands the cache: the key up-projection folds into the
  query and the value up-projection into the output,

      scores_h = (q_h W_uk,h) . c        out_h = W_uv,h (softmax(scores_h) . c)

  so decoding is MQA with one r-dim KV head.
* Multi-head latent attention with RoPE (`LatentRopeAttention`: Qwen3, Gemma, Gemma 2/3, GPT-NeoX):
  the same latent plus one RoPE key shared by all heads (DeepSeek's decoupled RoPE), at a subset of
  the source's frequency pairs. Queries stay the source's (q_proj, per-head q-norm, RoPE), followed by
  per-pair constants. Sources with a per-head key RMSNorm (Qwen3, Gemma 3) also cache one scale per
  source KV head and token, the norm's 1/rms, so their scores stay exact at full rank.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

# Every name a Transformers decoder layer has used to hand its attention module the KV cache:
# `cache` since 5.24, `past_key_values` before (a deprecated alias until 5.40), `past_key_value` in
# late 4.x, `layer_past` in GPT-NeoX's layers. Checkpoints carry this file and are loaded under
# whatever version a user has, so the attention modules accept all of them.
CACHE_ARGUMENT_NAMES = ("cache", "past_key_values", "past_key_value", "layer_past")


def takes_cache(forward):
    """Decorate an attention `forward(self, hidden_states, ..., cache=None, **kwargs)` so that it
    receives the cache as `cache` under any name in CACHE_ARGUMENT_NAMES (one compatibility point
    instead of a renamed argument in every module)."""

    @functools.wraps(forward)
    def wrapper(self, *args, **kwargs):
        given = [kwargs.pop(name) for name in CACHE_ARGUMENT_NAMES if name in kwargs]
        cache = next((c for c in given if c is not None), None)
        return forward(self, *args, cache=cache, **kwargs)

    return wrapper


def set_key_value_heads(config, num_key_value_heads: int | None) -> None:
    """`num_key_value_heads` on a hosted config (default: one per query head), checked."""
    config.num_key_value_heads = num_key_value_heads or config.num_attention_heads
    if config.num_attention_heads % config.num_key_value_heads:
        raise ValueError(f"num_key_value_heads ({config.num_key_value_heads}) must divide "
                         f"num_attention_heads ({config.num_attention_heads}).")


def eager_gqa_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                        softmax_dtype=None, softcap=None, **kwargs):
    """Reference attention for any KV head count: each KV head serves its group of query heads.
    `softmax_dtype`: float32 where the parent class's eager attention upcasts (OPT, GPT-NeoX);
    `softcap`: Gemma 2's tanh cap on the scores."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    weights = torch.matmul(query, key.transpose(2, 3)) * (query.shape[-1] ** -0.5 if scaling is None else scaling)
    if softcap is not None:
        weights = torch.tanh(weights / softcap) * softcap
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = F.softmax(weights, dim=-1, dtype=softmax_dtype).to(value.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def latent_attention(q_latent, latent, q_rope=None, k_rope=None, *, scaling: float, attention_mask=None,
                     key_scale=None, softcap: float | None = None, is_causal: bool = True, dropout: float = 0.0,
                     training: bool = False):
    """Absorbed attention over a latent cache (MQA with one KV head that is never expanded).

    q_latent (B, H, Q, r) against latent (B, K, r), plus q_rope (B, H, Q, p) against the shared
    RoPE key k_rope (B, K, p); key_scale (B, H, K) multiplies the scores (q/k-norm sources).
    Without a mask, causality is SDPA's is_causal (query i sees keys 0..i), which is what
    Transformers' mask functions mean when they return None.
    Returns the latent context softmax(scores) . c, (B, H, Q, r). Every head's queries are rows of
    one matmul against the cache, read in place: nothing is repeated or concatenated per step.
    """
    b, heads, q_len, rank = q_latent.shape
    k_len = latent.shape[1]
    scores = torch.bmm(q_latent.reshape(b, heads * q_len, rank), latent.transpose(1, 2))
    if q_rope is not None:
        scores = torch.baddbmm(scores, q_rope.reshape(b, heads * q_len, -1), k_rope.transpose(1, 2))
    scores = scores.view(b, heads, q_len, k_len)
    if key_scale is not None:
        scores = scores * key_scale[:, :, None]
    scores = scores.float() * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    mask = None if attention_mask is None else attention_mask[..., :k_len]
    if mask is None and is_causal and q_len > 1:  # SDPA's is_causal: query i sees keys 0..i
        mask = torch.ones(q_len, k_len, dtype=torch.bool, device=scores.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool else scores + mask
    probs = F.dropout(scores.softmax(-1).to(latent.dtype), p=dropout, training=training)
    return torch.bmm(probs.view(b, heads * q_len, k_len), latent).view(b, heads, q_len, rank)


class LatentKV(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, rank: int):
        super().__init__()
        self.num_heads, self.head_dim, self.rank = num_heads, head_dim, rank
        self.kv_a_proj = nn.Linear(hidden_size, rank, bias=True)
        self.kv_b_proj = nn.Linear(rank, num_heads * 2 * head_dim, bias=False)

    def latent(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, T, hidden) -> (B, 1, T, r): what the cache stores (as a one-head key)."""
        return self.kv_a_proj(hidden_states)[:, None]

    def attend(self, module, query, latent, attention_mask, scaling, dropout, attention, absorb: bool):
        """query (B, H, Q, hd), latent (B, 1, K, r) -> attention output (B, Q, H, hd)."""
        if absorb:
            w = self.kv_b_proj.weight.view(self.num_heads, 2 * self.head_dim, self.rank)
            w_uk, w_uv = w[:, : self.head_dim], w[:, self.head_dim:]
            q_latent = torch.einsum("bhqd,hdr->bhqr", query, w_uk)
            scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
            out = latent_attention(q_latent, latent[:, 0], scaling=scaling, attention_mask=attention_mask,
                                   is_causal=getattr(module, "is_causal", True), dropout=dropout,
                                   training=module.training)
            return torch.einsum("bhqr,hvr->bqhv", out, w_uv)
        b, _, length, _ = latent.shape
        kv = self.kv_b_proj(latent[:, 0]).view(b, length, self.num_heads, 2 * self.head_dim).transpose(1, 2)
        key, value = kv.split(self.head_dim, dim=-1)
        out, _ = attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling)
        return out


def cache_latent(cache, latent: torch.Tensor, layer_idx: int) -> torch.Tensor:
    """Append this step's latent to the cache (stored as keys; values hold nothing) and return all."""
    if cache is None:
        return latent
    latent, _ = cache.update(latent, latent[..., :0], layer_idx)
    return latent


def of_layer(value, layer_idx: int):
    """A config field that is one value for all layers, or a list with one per layer (kvslim's
    per-layer cache allocation)."""
    return value[layer_idx] if isinstance(value, (list, tuple)) else value


class LatentRopeAttention(nn.Module):
    """Multi-head latent attention with a shared RoPE key, for sources with RoPE in every head.

    Per head h (source head dim hd; P kept frequency pairs; r latent rank):

        q_h      = q_norm(q_proj(x))_h                         the source's query, exactly
        q_nope_h = q_h * q_nope_scale                           E[cos] stand-in for dropped rotations
        q_rope_h = rope(fold_h * q_h[kept pairs])               per-pair complex constants
        c        = kv_a_proj(x)                                 cached (r)
        k_rope   = rope(k_rope_proj(x))                         cached (2P), shared by all heads
        s_g      = key_scale_mean_g / rms(k_norm_proj(x)_g)     cached (one per source KV head g), q/k-norm sources only
        [k_nope_h; v_h] = kv_b_proj_h(c)
        score_h  = scaling * s_g(h) * (q_nope_h . k_nope_h + q_rope_h . k_rope)

    Rotary pairs are stored as [real parts (P); imaginary parts (P)] and rotated with the cos/sin
    the model already computes for its own heads (`rope_re` indexes them), so any subset of the
    source's frequencies can be kept, per layer. Prefill expands c into keys and values and runs
    the model's attention function; single-token decode works on the cache directly (absorbed).
    """

    def __init__(self, config, layer_idx: int, *, head_dim: int, scaling: float, num_key_value_heads: int,
                 attention_bias: bool = False, output_bias: bool = False, key_norm: bool = False,
                 norm_eps: float = 1e-6, softcap: float | None = None, sliding_window: int | None = None):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.num_heads, self.head_dim, self.scaling = config.num_attention_heads, head_dim, scaling
        self.num_key_value_heads = num_key_value_heads  # the source's: one key scale each
        self.num_key_value_groups = 1  # keys/values are expanded per head
        self.rank, self.pairs = of_layer(config.kv_lora_rank, layer_idx), of_layer(config.qk_rope_head_dim, layer_idx) // 2
        self.softcap, self.sliding_window, self.norm_eps = softcap, sliding_window, norm_eps
        self.attention_dropout = getattr(config, "attention_dropout", 0.0)
        self.is_causal = True
        hidden, nh, hd, P = config.hidden_size, self.num_heads, head_dim, self.pairs
        self.q_proj = nn.Linear(hidden, nh * hd, bias=attention_bias)
        self.q_norm = nn.Parameter(torch.ones(hd)) if key_norm else None  # effective weight (Gemma's 1 + w)
        self.q_nope_scale = nn.Parameter(torch.ones(hd))
        self.q_rope_fold = nn.Parameter(torch.zeros(2, nh, P))  # real, imaginary
        self.kv_a_proj = nn.Linear(hidden, self.rank, bias=True)
        self.kv_b_proj = nn.Linear(self.rank, nh * 2 * hd, bias=False)
        self.k_rope_proj = nn.Linear(hidden, 2 * P, bias=True)
        self.k_norm_proj = nn.Linear(hidden, num_key_value_heads * hd, bias=attention_bias) if key_norm else None
        self.key_scale_mean = nn.Parameter(torch.ones(num_key_value_heads)) if key_norm else None
        self.o_proj = nn.Linear(nh * hd, hidden, bias=output_bias)
        self.register_buffer("rope_re", torch.zeros(P, dtype=torch.long))  # source dims of the kept pairs
        self.register_buffer("rope_im", torch.zeros(P, dtype=torch.long))

    def _rotate(self, parts: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """parts (..., 2P) = [re; im] at positions whose cos/sin (..., P) are given."""
        re, im = parts.chunk(2, dim=-1)
        return torch.cat([re * cos - im * sin, im * cos + re * sin], dim=-1)

    def _rms_scale(self, x: torch.Tensor) -> torch.Tensor:
        return torch.rsqrt(x.float().pow(2).mean(-1) + self.norm_eps)

    @takes_cache
    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        b, t, _ = hidden_states.shape
        nh, hd = self.num_heads, self.head_dim
        cos, sin = position_embeddings
        cos, sin = cos[..., self.rope_re], sin[..., self.rope_re]  # (B or 1, T, P)

        query = self.q_proj(hidden_states).view(b, t, nh, hd)
        if self.q_norm is not None:
            query = (query.float() * self._rms_scale(query)[..., None]).to(query.dtype) * self.q_norm
        q_nope = query * self.q_nope_scale
        re, im = query[..., self.rope_re], query[..., self.rope_im]  # (B, T, nh, P)
        fr, fi = self.q_rope_fold
        q_rope = self._rotate(torch.cat([re * fr - im * fi, re * fi + im * fr], dim=-1), cos[:, :, None], sin[:, :, None])
        query = torch.cat([q_nope, q_rope], dim=-1).transpose(1, 2)  # (B, nh, T, hd + 2P)

        entry = [self.kv_a_proj(hidden_states), self._rotate(self.k_rope_proj(hidden_states), cos, sin)]
        if self.k_norm_proj is not None:
            keys = self.k_norm_proj(hidden_states).view(b, t, self.num_key_value_heads, hd)
            entry.append((self._rms_scale(keys) * self.key_scale_mean).to(hidden_states.dtype))
        entry = cache_latent(cache, torch.cat(entry, dim=-1)[:, None], self.layer_idx)[:, 0]  # (B, K, width)
        latent, k_rope = entry[..., : self.rank], entry[..., self.rank: self.rank + 2 * self.pairs]
        scale = None
        if self.k_norm_proj is not None:  # (B, nh, K): each query head's source KV head
            groups = nh // self.num_key_value_heads
            scale = entry[..., self.rank + 2 * self.pairs:].transpose(1, 2).repeat_interleave(groups, dim=1)

        dropout = self.attention_dropout if self.training else 0.0
        if cache is not None and t == 1 and not self.training:
            out = self._absorbed(query, latent, k_rope, scale, attention_mask)
        else:
            kv = self.kv_b_proj(latent).view(b, -1, nh, 2 * hd).transpose(1, 2)
            k_nope, value = kv.split(hd, dim=-1)
            key = torch.cat([k_nope, k_rope[:, None].expand(-1, nh, -1, -1)], dim=-1)
            if scale is not None:
                key = key * scale[..., None]
            attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_gqa_attention)
            extra = {"softcap": self.softcap} if self.softcap is not None else {}
            if self.sliding_window is not None:
                extra["sliding_window"] = self.sliding_window
            out, _ = attention(self, query, key, value, attention_mask, dropout=dropout, scaling=self.scaling, **extra)
        return self.o_proj(out.reshape(b, t, nh * hd).contiguous()), None

    def _absorbed(self, query, latent, k_rope, scale, attention_mask):
        """One query token against the cache, without expanding it: the key up-projection folds
        into the query and the value up-projection into the output."""
        nh, hd = self.num_heads, self.head_dim
        w = self.kv_b_proj.weight.view(nh, 2 * hd, self.rank)
        q_latent = torch.einsum("bhqd,hdr->bhqr", query[..., :hd], w[:, :hd])
        context = latent_attention(q_latent, latent, query[..., hd:], k_rope, scaling=self.scaling,
                                   attention_mask=attention_mask, key_scale=scale, softcap=self.softcap)
        return torch.einsum("bhqr,hvr->bqhv", context, w[:, hd:])


def latent_rope_config(base):
    """`base` (a Transformers config class) plus the two fields LatentRopeAttention reads (each an
    int, or a list with one value per layer)."""

    class LatentRopeConfig(base):
        def __init__(self, kv_lora_rank: int = 64, qk_rope_head_dim: int = 16, **kwargs):
            super().__init__(**kwargs)
            self.kv_lora_rank, self.qk_rope_head_dim = kv_lora_rank, qk_rope_head_dim

    return LatentRopeConfig


def use_latent_rope_attention(layers: nn.ModuleList, config, attribute: str = "self_attn") -> None:
    """Replace each layer's attention module (`attribute`) by LatentRopeAttention, with the
    family's settings read from its config: head dim, query scaling (Gemma's
    query_pre_attn_scalar), biases, the key norm (`latent_key_norm` of kvslim's config class),
    soft-capping (Gemma 2) and sliding windows (per layer type; on every layer where the config
    has no layer types, as Phi-3)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    scalar = getattr(config, "query_pre_attn_scalar", None) or head_dim
    layer_types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    bias = getattr(config, "attention_bias", False)
    query_bias = getattr(config, "qkv_bias", bias)  # Qwen2-MoE: biases on q/k/v only
    for i, layer in enumerate(layers):
        sliding = layer_types is None or layer_types[i] == "sliding_attention"
        setattr(layer, attribute, LatentRopeAttention(
            config, i, head_dim=head_dim, scaling=scalar**-0.5, num_key_value_heads=config.num_key_value_heads,
            attention_bias=query_bias, output_bias=bias, key_norm=getattr(config, "latent_key_norm", False),
            norm_eps=getattr(config, "rms_norm_eps", 1e-6), softcap=getattr(config, "attn_logit_softcapping", None),
            sliding_window=window if sliding else None))
