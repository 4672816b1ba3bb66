"""What a model's attention costs: heads, head dims, KV cache bytes per token, parameters."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..convert.adapters import class_uses_kv_heads
from ..convert.records import kv_bytes_per_token

CONTEXTS = (4096, 32768, 131072)


@dataclass
class ModelSummary:
    source: str
    architecture: str
    model_type: str
    attention: str  # MHA, GQA, MQA or MLA
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    dtype: str
    kv_elements_per_token_per_layer: float  # the mean, where layers differ (per-layer MLA)
    kv_bytes_per_token: int
    num_parameters: int | None = None
    conversion: dict | None = None

    def kv_bytes(self, context: int, batch: int = 1) -> int:
        return self.kv_bytes_per_token * context * batch

    def to_dict(self) -> dict:
        d = asdict(self)
        d["kv_bytes_at_context"] = {str(c): self.kv_bytes(c) for c in CONTEXTS}
        return d


def _dtype(config) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, torch.float32)
    return dtype


def describe(config, source: str = "", num_parameters: int | None = None) -> ModelSummary:
    """Summarise the attention of any decoder/encoder config (GPT-2 style names included)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    get = lambda *names, default=None: next((getattr(text, n) for n in names if getattr(text, n, None) is not None), default)  # noqa: E731
    layers = get("num_hidden_layers", "n_layer", "num_layers")
    heads = get("num_attention_heads", "n_head")
    hidden = get("hidden_size", "n_embd", "d_model")
    dtype = _dtype(text)
    if get("kv_lora_rank") is not None:  # DeepSeek-style multi-head latent attention
        rope, rank = get("qk_rope_head_dim", default=0), get("kv_lora_rank")
        # kvslim's hosted MLA for q/k-norm sources also caches one key-norm gain per source KV head
        scales = get("num_key_value_heads", default=heads) if getattr(text, "latent_key_norm", False) else 0
        ranks = rank if isinstance(rank, list) else [rank] * layers  # a list: per-layer shapes (kvslim's allocation)
        ropes = rope if isinstance(rope, list) else [rope] * layers
        layer_elements = [r + d + scales for r, d in zip(ranks, ropes)]
        rope = max(ropes)
        total = sum(layer_elements)
        per_layer = total // layers if total % layers == 0 else round(total / layers, 2)
        # DeepSeek's query/key head = nope + rope dims; kvslim's hosted MLA keeps the source's head dim
        nope = get("qk_nope_head_dim")
        head_dim = nope + rope if nope is not None else get("head_dim", default=hidden // heads)
        kv_heads, kind = 1, "MLA"
    else:
        kv_heads = get("num_key_value_heads", default=heads)
        if not class_uses_kv_heads(text.model_type):
            kv_heads = heads
        head_dim = get("head_dim", default=hidden // heads)
        per_layer = 2 * kv_heads * head_dim
        layer_elements = [per_layer] * layers
        kind = "MHA" if kv_heads == heads else "MQA" if kv_heads == 1 else "GQA"
    arch = (getattr(config, "architectures", None) or [type(config).__name__])[0]
    return ModelSummary(
        source=source, architecture=arch, model_type=text.model_type, attention=kind, num_layers=layers,
        num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, hidden_size=hidden,
        dtype=str(dtype).removeprefix("torch."), kv_elements_per_token_per_layer=per_layer,
        kv_bytes_per_token=kv_bytes_per_token(layers, layer_elements, dtype), num_parameters=num_parameters,
        conversion=getattr(config, "kvslim", None),
    )


def inspect(model: str, revision: str | None = None) -> ModelSummary:
    """Summary of a Hub id, model directory or .gguf file, reading only headers where possible."""
    from ..convert.sources import open_source

    src = open_source(model, revision)
    count = 0
    for name in src.reader.keys():
        count += _numel(src, name)
    summary = describe(src.config, model, count)
    record = Path(src.directory) / "kvslim_conversion.json"
    if summary.conversion is None and record.is_file() and not src.gguf_file:
        summary.conversion = json.loads(record.read_text())
    return summary


def _numel(src, name: str) -> int:
    return math.prod(src.reader.shape(name))  # safetensors: from the header, no data read
