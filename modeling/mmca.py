"""Multi-modal causal attention with grouped-query heads (MMCA-GQA).

Following DeepSpeed-VisualChat's multi-modal causal attention:

* visual tokens attend bidirectionally among themselves (``visual_attention="bidirectional"``) or
  only to themselves (``"none"``, no mixing across image tokens); they never see text;
* text token i attends causally to text tokens j <= i, and to every (unpadded) visual token;
* the two text attentions are normalised separately (two softmaxes) and mixed with a fixed share
  ``image_weight`` for the image, so a long text cannot drown out the image:

      text_out_i = (1 - w) * softmax_j<=i(q_i k_j) V_text  +  w * softmax_all_visual(q_i k_v) V_visual

  (w = 0 for a sequence without any unpadded visual token).

K/V use ``kv_heads`` grouped heads; attention runs through ``scaled_dot_product_attention`` with
native GQA, so repeated K/V are never materialised (and FlashAttention kernels are used on GPUs
where SDPA picks them). Optional RoPE (``rope_theta``) numbers the image tokens first and the text
after them, as in a vision-language decoder's sequence, so a pretrained decoder attention layer can
be converted into this one with `kvslim.convert.mmca.mmca_from_attention`.

``SimpleMMCA(dim, heads, kv_heads=2, dropout=0.1, causal=True, qk_norm=False, flash=False)`` and
``forward(v, t) -> (visual_out, text_out)`` take the arguments of the ``mmca_mgqa`` package's class
of the same name. ``causal=False`` lets text attend to all text (encoder-style).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class MMCACache:
    """Decoding state: the image's K/V (computed once) and the text K/V so far."""

    visual_k: torch.Tensor | None = None
    visual_v: torch.Tensor | None = None
    visual_keep: torch.Tensor | None = None  # (B, Nv) bool
    visual_out: torch.Tensor | None = None
    text_k: list[torch.Tensor] = field(default_factory=list)
    text_v: list[torch.Tensor] = field(default_factory=list)
    text_keep: list[torch.Tensor] = field(default_factory=list)

    # In the MLA variant visual_k / text_k hold (latent, positions) and the *_v fields are unused.

    @property
    def text_length(self) -> int:
        return sum(k[0].shape[1] if isinstance(k, tuple) else k.shape[2] for k in self.text_k)

    def kv_bytes(self) -> int:
        """Bytes of cached K/V (or latents); positions are bookkeeping, not counted."""
        entries = [self.visual_k, self.visual_v, *self.text_k, *self.text_v]
        tensors = [e[0] if isinstance(e, tuple) else e for e in entries if e is not None]
        return sum(t.numel() * t.element_size() for t in tensors)


def _rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate-half RoPE on (B, H, N, hd) at integer positions (N,)."""
    hd = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, hd, 2, device=x.device, dtype=torch.float32) / hd))
    ang = positions.to(torch.float32)[:, None] * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos().to(x.dtype), torch.cat([ang, ang], -1).sin().to(x.dtype)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class SimpleMMCA(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int = 2, dropout: float = 0.1, causal: bool = True,
                 qk_norm: bool = False, flash: bool = False, *, head_dim: int | None = None,
                 image_weight: float = 0.5, visual_attention: str = "bidirectional",
                 rope_theta: float | None = None, bias: bool = False, kv_rank: int | None = None):
        super().__init__()
        if heads % kv_heads:
            valid = [n for n in range(1, heads + 1) if heads % n == 0]
            raise ValueError(f"kv_heads={kv_heads} must divide heads={heads}; valid: {valid}")
        if visual_attention not in ("bidirectional", "none"):
            raise ValueError("visual_attention must be 'bidirectional' or 'none'")
        if not 0.0 <= image_weight <= 1.0:
            raise ValueError("image_weight must be in [0, 1]")
        self.dim, self.heads, self.kv_heads = dim, heads, kv_heads
        self.head_dim = head_dim or dim // heads
        self.dropout, self.causal, self.flash = dropout, causal, flash
        self.image_weight, self.visual_attention, self.rope_theta = image_weight, visual_attention, rope_theta
        self.scale = self.head_dim ** -0.5
        self.q_proj = nn.Linear(dim, heads * self.head_dim, bias=bias)
        self.kv_rank = kv_rank
        if kv_rank is None:
            self.k_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=bias)
            self.v_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=bias)
        else:  # MLA variant: one latent per token, K and V are up-projections of it; the cache holds the latent
            self.kv_down = nn.Linear(dim, kv_rank, bias=bias)
            self.k_up = nn.Linear(kv_rank, kv_heads * self.head_dim, bias=False)
            self.v_up = nn.Linear(kv_rank, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(heads * self.head_dim, dim, bias=False)
        self.q_norm = nn.RMSNorm(self.head_dim) if qk_norm else None
        self.k_norm = nn.RMSNorm(self.head_dim) if qk_norm else None

    # -- projections ------------------------------------------------------------------------------

    def _split(self, x: torch.Tensor, proj: nn.Linear, heads: int, norm: nn.Module | None) -> torch.Tensor:
        b, n, _ = x.shape
        y = proj(x).view(b, n, heads, self.head_dim).transpose(1, 2)
        return norm(y) if norm is not None else y

    def _cached(self, x: torch.Tensor, positions: torch.Tensor):
        """(q, what the cache keeps): K/V heads, or the latent in the MLA variant."""
        q = self._split(x, self.q_proj, self.heads, self.q_norm)
        if self.rope_theta is not None:
            q = _rope(q, positions, self.rope_theta)
        if self.kv_rank is not None:
            return q, (self.kv_down(x), positions)
        k = self._split(x, self.k_proj, self.kv_heads, self.k_norm)
        if self.rope_theta is not None:
            k = _rope(k, positions, self.rope_theta)
        return q, (k, self._split(x, self.v_proj, self.kv_heads, None))

    def _expand(self, state) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V heads from a cache entry (the MLA latent is up-projected here)."""
        if self.kv_rank is None:
            return state
        latent, positions = state
        k = self._split(latent, self.k_up, self.kv_heads, self.k_norm)
        if self.rope_theta is not None:
            k = _rope(k, positions, self.rope_theta)
        return k, self._split(latent, self.v_up, self.kv_heads, None)

    def _qkv(self, x: torch.Tensor, positions: torch.Tensor):
        q, state = self._cached(x, positions)
        return (q, *self._expand(state))

    def _attend(self, q, k, v, allowed: torch.Tensor) -> torch.Tensor:
        """softmax(q k^T) v over allowed keys; rows with no allowed key return 0. allowed: (B, Nq, Nk)."""
        empty = ~allowed.any(-1)  # (B, Nq)
        mask = allowed | empty[..., None]  # avoid NaN rows, zeroed below
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask[:, None], dropout_p=self.dropout if self.training else 0.0,
            scale=self.scale, enable_gqa=self.kv_heads != self.heads)
        return out.masked_fill(empty[:, None, :, None], 0.0)

    def _merge(self, out: torch.Tensor) -> torch.Tensor:
        b, _, n, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, n, self.heads * self.head_dim))

    # -- forward ---------------------------------------------------------------------------------

    def forward(self, v: torch.Tensor | None, t: torch.Tensor, visual_mask: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None, cache: MMCACache | None = None):
        """v: (B, Nv, dim) visual tokens (None when decoding from `cache`), t: (B, Nt, dim) text.
        Masks are bool (B, N) with True = real token. Returns (visual_out, text_out)."""
        if v is None and (cache is None or cache.visual_k is None):
            raise ValueError("visual tokens are required unless a cache already holds them")
        b, nt, _ = t.shape
        device = t.device
        if cache is not None and cache.visual_k is not None:
            vstate = cache.visual_k if self.kv_rank is not None else (cache.visual_k, cache.visual_v)
            vk, vv = self._expand(vstate)
            vkeep, visual_out = cache.visual_keep, cache.visual_out
            nv = vk.shape[2]
        else:
            nv = v.shape[1]
            vkeep = torch.ones(b, nv, dtype=torch.bool, device=device) if visual_mask is None else visual_mask.bool()
            vq, vstate = self._cached(v, torch.arange(nv, device=device))
            vk, vv = self._expand(vstate)
            if self.visual_attention == "bidirectional":
                allowed = vkeep[:, None, :].expand(b, nv, nv)
            else:
                allowed = torch.eye(nv, dtype=torch.bool, device=device)[None].expand(b, nv, nv)
            allowed = allowed | torch.eye(nv, dtype=torch.bool, device=device)[None]
            visual_out = self._merge(self._attend(vq, vk, vv, allowed))
            visual_out = visual_out.masked_fill(~vkeep[..., None], 0.0)
            if cache is not None:
                cache.visual_k, cache.visual_v = (vstate, None) if self.kv_rank is not None else vstate
                cache.visual_keep, cache.visual_out = vkeep, visual_out

        past = cache.text_length if cache is not None else 0
        tkeep = torch.ones(b, nt, dtype=torch.bool, device=device) if text_mask is None else text_mask.bool()
        tq, tstate = self._cached(t, nv + past + torch.arange(nt, device=device))
        if cache is not None:
            cache.text_keep.append(tkeep)
            keys_keep = torch.cat(cache.text_keep, 1)
            if self.kv_rank is not None:
                cache.text_k.append(tstate)
                tstate = (torch.cat([lat for lat, _ in cache.text_k], 1), torch.cat([p for _, p in cache.text_k]))
            else:
                cache.text_k.append(tstate[0])
                cache.text_v.append(tstate[1])
                tstate = (torch.cat(cache.text_k, 2), torch.cat(cache.text_v, 2))
        else:
            keys_keep = tkeep
        tk, tv = self._expand(tstate)
        total = past + nt
        allowed_tt = keys_keep[:, None, :].expand(b, nt, total)
        if self.causal:
            query_pos = past + torch.arange(nt, device=device)
            allowed_tt = allowed_tt & (torch.arange(total, device=device)[None, :] <= query_pos[:, None])[None]
        text_part = self._attend(tq, tk, tv, allowed_tt)
        image_part = self._attend(tq, vk, vv, vkeep[:, None, :].expand(b, nt, nv))
        # An unpadded text query always sees itself, so only "no visual token at all" needs care.
        w_image = vkeep.any(-1).to(t.dtype)[:, None, None, None] * self.image_weight  # (B,1,1,1)
        mixed = (1 - w_image) * text_part + w_image * image_part
        text_out = self._merge(mixed).masked_fill(~tkeep[..., None], 0.0)
        return visual_out, text_out

    @torch.no_grad()
    def attention_weights(self, v: torch.Tensor, t: torch.Tensor, visual_mask=None, text_mask=None):
        """Effective (image_weights (B,H,Nt,Nv), text_weights (B,H,Nt,Nt)) of the text queries: the
        mixed distribution the text output is a weighted sum under (for inspection and tests)."""
        b, nt, _ = t.shape
        nv = v.shape[1]
        vkeep = torch.ones(b, nv, dtype=torch.bool) if visual_mask is None else visual_mask.bool()
        tkeep = torch.ones(b, nt, dtype=torch.bool) if text_mask is None else text_mask.bool()
        _, vk, _ = self._qkv(v, torch.arange(nv))
        tq, tk, _ = self._qkv(t, nv + torch.arange(nt))
        rep = self.heads // self.kv_heads
        vk, tk = vk.repeat_interleave(rep, 1), tk.repeat_interleave(rep, 1)
        allowed_tt = tkeep[:, None, None, :].expand(b, 1, nt, nt)
        if self.causal:
            allowed_tt = allowed_tt & torch.ones(nt, nt, dtype=torch.bool).tril()
        s_tt = (tq @ tk.transpose(-1, -2) * self.scale).masked_fill(~allowed_tt, float("-inf")).softmax(-1)
        s_tv = (tq @ vk.transpose(-1, -2) * self.scale).masked_fill(~vkeep[:, None, None, :], float("-inf")).softmax(-1)
        w = self.image_weight * vkeep.any(-1).float()[:, None, None, None]
        return w * torch.nan_to_num(s_tv), (1 - w) * torch.nan_to_num(s_tt)
