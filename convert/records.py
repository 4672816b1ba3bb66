"""What a conversion did, as typed records: one for head merging (GQA/MQA/MHA), one for MLA.

A record is stored twice beside the weights: in config.json (key "kvslim") and in
kvslim_conversion.json. The JSON keeps the field names of the first, untyped form (version 1), so
readers of that form keep working; `read_record` reads both forms back into the typed records.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields

import torch

from .formatting import plural

RECORD_FILE = "kvslim_conversion.json"
RECORD_VERSION = 2
# MLA variants: how the latent is laid out, which decides the class that runs it
DEEPSEEK, LATENT, LATENT_ROPE = "deepseek_v3", "latent", "latent_rope"


@dataclass(frozen=True)
class MLADetails(Mapping):
    """The latent attention an MLA conversion wrote. A read-only mapping too, so that code written
    against the untyped record (`record.mla["kv_rank"]`) keeps working."""

    variant: str  # DEEPSEEK: DeepseekV3 class; LATENT: hosted, no RoPE; LATENT_ROPE: hosted + RoPE key
    kv_rank: int | list[int]  # a list: one per layer (per-layer allocation, hosted classes)
    rope_dim: int | list[int]
    cache_elements_per_layer: int | list[int]
    init: str
    rope_strategy: str
    latent_anchor: int = 0  # DeepseekV3: one latent element that carries the K/V biases
    key_norm_scales: int | None = None  # LATENT_ROPE: cached key-norm gains per token and layer
    context_for_beta: int | None = None
    rope_frequencies: dict | list | None = None  # one {start, stride} (DeepseekV3) or one per layer
    query_bias_via_q_lora: bool | None = None
    model_class: str | None = None
    qk_norm: str | None = None
    runtime: str | None = None  # DEEPSEEK: "transformers" or "vllm" (bias-free, vLLM's kernel shapes)
    latent_padding: int | None = None  # vLLM: zero latent rows beyond the source's rank
    constant_fit_error: list | None = None  # vLLM: per layer, relative RMS error of u.x as the constant 1
    allocation: dict | None = None  # LATENT_ROPE: how the budget was spread over layers ("kind", "rule", ...)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def __getitem__(self, key: str):
        return self.to_dict()[key]  # KeyError for fields this variant does not set, as before

    def __iter__(self):
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())


@dataclass
class ConversionRecord:
    """Fields every conversion records."""

    source: str
    target: str
    method: str
    architecture: str
    num_layers: int
    num_heads: int
    head_dim: int
    kv_heads_before: int
    kv_heads_after: int
    dtype: str
    kv_bytes_per_token_before: int
    kv_bytes_per_token_after: int
    calibration: dict | None = None
    refinement: dict | None = None
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    kvslim_version: str = ""

    def to_dict(self) -> dict:
        return {"record_version": RECORD_VERSION, **asdict(self)}

    def summary(self) -> str:
        raise NotImplementedError


@dataclass
class HeadMergeRecord(ConversionRecord):
    """GQA, MQA or MHA: KV heads merged (or replicated), the attention class unchanged."""

    regrouped: bool = False
    groups: list[list[list[int]]] | None = None
    mla: None = None  # version-1 readers test `record.get("mla")` to tell the kinds apart

    def summary(self) -> str:
        kind = {1: "MQA"}.get(self.kv_heads_after, "GQA" if self.kv_heads_after < self.num_heads else "MHA")
        return f"{kind}: {self.num_heads} query heads, {plural(self.kv_heads_after, 'KV head')}"


@dataclass
class MLARecord(ConversionRecord):
    """MLA: keys and values of all heads from one cached latent (plus a shared RoPE key)."""

    mla: MLADetails | None = None
    regrouped: bool = False
    groups: None = None

    def to_dict(self) -> dict:
        out = super().to_dict()
        out["mla"] = self.mla.to_dict()
        return out

    def summary(self) -> str:
        m, heads = self.mla, self.num_heads
        if m.variant == LATENT:
            per_layer = " (per layer)" if isinstance(m.kv_rank, list) else ""
            return (f"multi-head latent attention: keys and values of all {heads} heads from one cached "
                    f"latent of rank {span(m.kv_rank)}{per_layer} (kvslim's hosted class)")
        if m.variant == LATENT_ROPE:
            scales = f" and {m.key_norm_scales} key-norm gains" if m.key_norm_scales else ""
            per_layer = " (per layer)" if isinstance(m.kv_rank, list) else ""
            return (f"multi-head latent attention: latent rank {span(m.kv_rank)}, a {span(m.rope_dim)}-dim RoPE key "
                    f"shared by all {heads} heads{scales} per token{per_layer} (kvslim's hosted class)")
        pad = f", +{m.latent_padding} padding" if m.latent_padding else ""
        serve = ", for vLLM" if m.runtime == "vllm" else ""
        return (f"multi-head latent attention (DeepSeek-V3 format{serve}): latent rank {m.kv_rank} (+{m.latent_anchor} "
                f"anchor{pad}) and a {m.rope_dim}-dim RoPE key shared by all {heads} heads")


def span(value: int | list[int]) -> str:
    """An int, or a per-layer list as its range ("32-96")."""
    if not isinstance(value, list):
        return str(value)
    low, high = min(value), max(value)
    return str(low) if low == high else f"{low}-{high}"


def _variant_of_version_1(mla: dict) -> str:
    """Version-1 records did not name the variant; their keys tell it."""
    if mla.get("latent_anchor"):
        return DEEPSEEK
    return LATENT_ROPE if mla.get("rope_dim") else LATENT


def read_record(data: dict) -> ConversionRecord:
    """A typed record from its JSON form (version 1 or 2). Unknown keys are ignored."""
    data = dict(data)
    data.pop("record_version", None)
    mla = data.get("mla")
    cls = MLARecord if mla else HeadMergeRecord
    if mla:
        mla = {"variant": _variant_of_version_1(mla), **mla}
        names = {f.name for f in fields(MLADetails)}
        data["mla"] = MLADetails(**{k: v for k, v in mla.items() if k in names})
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


def kv_bytes_per_token(num_layers: int, elements_per_layer: int | list[int], dtype) -> int:
    """KV-cache bytes per token: what every layer caches per token (2 x KV heads x head dim for
    GQA; latent + RoPE key + scales for MLA; a list: each layer's), over all layers, in `dtype`."""
    total = sum(elements_per_layer) if isinstance(elements_per_layer, list) else num_layers * elements_per_layer
    return total * torch.tensor([], dtype=dtype).element_size()
