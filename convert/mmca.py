"""Initialise kvslim's multimodal cross-attention layer (modeling/mmca.py) from a pretrained
decoder attention, its KV heads merged by the GQA converter."""

from __future__ import annotations

import torch
from torch import nn

from ..modeling.mmca import SimpleMMCA
from .adapters import AttentionLayout
from .gqa import AttentionWeights, convert_attention


def mmca_from_attention(attention: nn.Module, kv_heads: int, method: str = "mean",
                        cov: torch.Tensor | None = None, **kwargs) -> SimpleMMCA:
    """An MMCA-GQA layer from a pretrained decoder attention (Llama-family q/k/v/o_proj), its
    KV heads merged by kvslim's converter (`method`: "mean" or "aware" with an input
    second-moment `cov` from calibration data, see kvslim.convert.gqa)."""
    q, k, vp, o = attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj
    config = getattr(attention, "config", None)
    head_dim = getattr(attention, "head_dim", None) or q.out_features // config.num_attention_heads
    heads = q.out_features // head_dim
    layout = AttentionLayout(1, heads, k.out_features // head_dim, head_dim, q.in_features)
    weights = AttentionWeights(q.weight.detach(), k.weight.detach(), vp.weight.detach(), o.weight.detach(),
                               q.bias, k.bias, vp.bias)
    new = convert_attention(weights, layout, kv_heads, method, cov=cov)
    rope = None
    if config is not None and getattr(config, "rope_parameters", None):
        rope = config.rope_parameters.get("rope_theta")
    kwargs.setdefault("rope_theta", rope)
    kwargs.setdefault("dropout", 0.0)
    layer = SimpleMMCA(q.in_features, heads, kv_heads, head_dim=head_dim, bias=q.bias is not None, **kwargs)
    with torch.no_grad():
        layer.q_proj.weight.copy_(new.q_w)
        layer.k_proj.weight.copy_(new.k_w)
        layer.v_proj.weight.copy_(new.v_w)
        layer.o_proj.weight.copy_(new.o_w)
        if q.bias is not None:
            layer.q_proj.bias.copy_(new.q_b)
            layer.k_proj.bias.copy_(new.k_b)
            layer.v_proj.bias.copy_(new.v_b)
    return layer
