"""Per-architecture knowledge behind one small interface.

An adapter tells the converter where a layer's attention projections live, how RoPE pairs the
head dimensions, and whether the architecture carries biases or per-head q/k norms. Adding an
architecture means registering one more adapter, not adding branches to the converter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class AttentionLayout:
    """Head counts and sizes of one model's attention, read from its config."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclass(frozen=True)
class AttentionAdapter:
    """Where the attention weights of a decoder-only architecture live.

    `rope_layout` is "half" for the rotate-half convention used by Transformers' Llama family
    (dimension f pairs with f + head_dim/2) and "interleaved" when dimension 2f pairs with 2f+1.
    `qk_norm` marks architectures that RMS-normalise each query/key head before RoPE (Qwen3,
    Gemma 3); their norm weight is shared by all heads, which limits what can be folded into q.
    """

    name: str
    model_types: tuple[str, ...]
    layer_prefix: str = "model.layers.{i}."
    q_proj: str = "self_attn.q_proj"
    k_proj: str = "self_attn.k_proj"
    v_proj: str = "self_attn.v_proj"
    o_proj: str = "self_attn.o_proj"
    attention_module: str = "self_attn"
    qk_norm: bool = False
    qk_norm_offset: float = 0.0  # Gemma's RMSNorm scales by (1 + weight)
    q_norm: str = "self_attn.q_norm"
    k_norm: str = "self_attn.k_norm"
    rope_layout: str = "half"
    kv_heads_key: str = "num_key_value_heads"

    def layout(self, config: Any) -> AttentionLayout:
        text = text_config(config)
        heads = text.num_attention_heads
        kv = getattr(text, self.kv_heads_key, None) or heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        return AttentionLayout(text.num_hidden_layers, heads, kv, head_dim, text.hidden_size)

    def prefix(self, layer: int) -> str:
        return self.layer_prefix.format(i=layer)

    def tensor_name(self, layer: int, module: str, kind: str = "weight") -> str:
        return f"{self.prefix(layer)}{module}.{kind}"

    def set_kv_heads(self, config: Any, kv_heads: int) -> None:
        setattr(text_config(config), self.kv_heads_key, kv_heads)


def text_config(config: Any) -> Any:
    """The config that holds the decoder's attention fields (multimodal configs nest it)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


_REGISTRY: dict[str, AttentionAdapter] = {}


def register_adapter(adapter: AttentionAdapter) -> AttentionAdapter:
    for model_type in adapter.model_types:
        _REGISTRY[model_type] = adapter
    return adapter


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def get_adapter(model_type: str) -> AttentionAdapter:
    from .errors import ConversionError

    try:
        return _REGISTRY[model_type]
    except KeyError:
        raise ConversionError(
            f"Unsupported architecture '{model_type}'. kvslim can convert: "
            f"{', '.join(supported_model_types())}."
        ) from None


# Llama-style attention: separate q/k/v/o projections, rotate-half RoPE. Biases (Qwen2) are
# picked up from the checkpoint itself, so one adapter covers with- and without-bias variants.
register_adapter(AttentionAdapter("llama", ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe")))
register_adapter(AttentionAdapter("gemma", ("gemma", "gemma2")))
# Per-head q/k RMSNorm before RoPE.
register_adapter(AttentionAdapter("qwen3", ("qwen3", "qwen3_moe"), qk_norm=True))
register_adapter(AttentionAdapter("gemma3", ("gemma3_text",), qk_norm=True, qk_norm_offset=1.0))
