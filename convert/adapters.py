"""Per-architecture knowledge behind one small interface.

An adapter tells the converter where a layer's attention projections live, how RoPE pairs the
head dimensions, and whether the architecture carries biases or per-head q/k norms. Adding an
architecture means registering one more adapter, not adding branches to the converter.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from .errors import ConversionError


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


@dataclass
class AttentionWeights:
    """One layer's attention projections in nn.Linear layout (out_features x in_features)."""

    q_w: torch.Tensor
    k_w: torch.Tensor
    v_w: torch.Tensor
    o_w: torch.Tensor
    q_b: torch.Tensor | None = None
    k_b: torch.Tensor | None = None
    v_b: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None  # shared per-head RMSNorm weights, if the model has them
    k_norm: torch.Tensor | None = None
    o_b: torch.Tensor | None = None  # output-projection bias (read only where a converter replaces o_proj)


@dataclass(frozen=True)
class AttentionAdapter:
    """Where the attention weights of an architecture live, and how to read and write them.

    `rope_layout` is "half" for the rotate-half convention used by Transformers' Llama family
    (dimension f pairs with f + head_dim/2), "interleaved" when dimension 2f pairs with 2f+1, and
    "none" without rotary embeddings (learned or no positions). `qk_norm` marks architectures
    that RMS-normalise each query/key head before RoPE (Qwen3, Gemma 3); their norm weight is
    shared by all heads, which limits what can be folded into q. `hosted` names the kvslim model
    class for architectures whose Transformers class ignores `num_key_value_heads`.

    MLA output: `deepseek_mla` marks architectures whose blocks DeepseekV3 reproduces exactly
    (SwiGLU MLP, RMSNorm with weight, plain embeddings, no per-head q/k norm), written as
    DeepseekV3 when RoPE covers the whole head; `hosted_mla` marks those for which kvslim hosts a
    latent-attention class of the same name as the model type (used otherwise).

    The default reads separate q/k/v/o nn.Linear projections; subclasses override `read` and
    `write` for fused layouts.
    """

    name: str
    model_types: tuple[str, ...]
    base_path: str = "model"  # the module that embeds tokens and holds the layers
    layers_path: str = "model.layers"
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
    model_kind: str = "causal"  # "causal" (AutoModelForCausalLM) or "base" (AutoModel: encoders)
    hosted: str | None = None
    deepseek_mla: bool = False
    hosted_mla: bool = False
    stored_as_hosted: bool = False  # the source is kvslim's hosted class (its own tensor layout)
    # GGUF: tensors read one at a time under the gguf package's name map (else Transformers'
    # loader dequantises the whole file), and the GGUF architectures whose q/k rows llama.cpp
    # permuted for its RoPE kernel
    gguf_lazy: bool = False
    gguf_permuted_qk: tuple[str, ...] = ()

    def mla_hosted_class(self, model_type: str) -> str | None:
        """The kvslim-hosted class an MLA conversion of `model_type` writes, if any."""
        return self.hosted or (model_type if self.hosted_mla else None)

    def layout(self, config: Any) -> AttentionLayout:
        text = text_config(config)
        heads = text.num_attention_heads
        kv = getattr(text, self.kv_heads_key, None) or heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        return AttentionLayout(text.num_hidden_layers, heads, kv, head_dim, text.hidden_size)

    def rope(self, config: Any) -> str:
        """The RoPE layout of `config`'s heads (see gqa.pair_indices), partial rotary included."""
        if self.rope_layout == "none":
            return "none"
        text = text_config(config)
        factor = getattr(text, "partial_rotary_factor", None) or \
            (getattr(text, "rope_parameters", None) or {}).get("partial_rotary_factor") or 1.0
        head_dim = self.layout(config).head_dim
        return self.rope_layout if factor >= 1.0 else f"{self.rope_layout}:{int(head_dim * factor)}"

    def prefix(self, layer: int) -> str:
        return f"{self.layers_path}.{layer}."

    def tensor_name(self, layer: int, module: str, kind: str = "weight") -> str:
        return f"{self.prefix(layer)}{module}.{kind}"

    def required(self, layer: int) -> list[str]:
        """Tensors every layer must have (checked before converting)."""
        return [self.tensor_name(layer, m) for m in (self.q_proj, self.k_proj, self.v_proj, self.o_proj)]

    def read(self, reader, layer: int, layout: AttentionLayout):
        """This layer's attention as AttentionWeights (nn.Linear layout); `layout` is the source's."""
        keys = reader.keys()

        def get(module: str, kind: str = "weight"):
            name = self.tensor_name(layer, module, kind)
            return reader.get(name) if name in keys else None

        q_norm = get(self.q_norm) if self.qk_norm else None
        k_norm = get(self.k_norm) if self.qk_norm else None
        if q_norm is not None and self.qk_norm_offset:
            q_norm = q_norm.float() + self.qk_norm_offset
            k_norm = k_norm.float() + self.qk_norm_offset
        return AttentionWeights(
            q_w=get(self.q_proj), k_w=get(self.k_proj), v_w=get(self.v_proj), o_w=get(self.o_proj),
            q_b=get(self.q_proj, "bias"), k_b=get(self.k_proj, "bias"), v_b=get(self.v_proj, "bias"), q_norm=q_norm,
            k_norm=k_norm,
        )

    def write(self, w, layer: int) -> dict:
        """Checkpoint tensors of converted AttentionWeights (the inverse of `read`)."""
        out = {self.tensor_name(layer, self.q_proj): w.q_w, self.tensor_name(layer, self.k_proj): w.k_w,
               self.tensor_name(layer, self.v_proj): w.v_w, self.tensor_name(layer, self.o_proj): w.o_w}
        for module, bias in ((self.q_proj, w.q_b), (self.k_proj, w.k_b), (self.v_proj, w.v_b)):
            if bias is not None:
                out[self.tensor_name(layer, module, "bias")] = bias
        return out

    def write_latent(self, w, latent: dict, layer: int) -> dict:
        """Checkpoint tensors of a hosted MLA layer: queries and output as before, keys and values
        from `latent` (convert_attention_latent's kv_a/kv_b)."""
        out = {self.tensor_name(layer, self.q_proj): self._put(w.q_w),
               self.tensor_name(layer, self.o_proj): self._put(w.o_w)}
        if w.q_b is not None:
            out[self.tensor_name(layer, self.q_proj, "bias")] = w.q_b
        base = f"{self.prefix(layer)}{self.q_proj.rsplit('.', 1)[0]}.latent."
        out.update({base + "kv_a_proj.weight": latent["kv_a_weight"], base + "kv_a_proj.bias": latent["kv_a_bias"],
                    base + "kv_b_proj.weight": latent["kv_b_weight"]})
        return out

    def _put(self, t):
        """A weight in nn.Linear layout as the checkpoint stores it."""
        return t

    def output_name(self, name: str) -> str:
        """The name a non-attention tensor gets in the converted checkpoint."""
        return name

    def deepseek_layer_tensors(self, reader, layer: int) -> tuple[dict, set]:
        """Non-attention tensors of `layer` that DeepseekV3 names differently: ({new name: tensor},
        {source names they replace}). Llama-family layers need none."""
        return {}, set()

    def set_kv_heads(self, config: Any, kv_heads: int) -> None:
        setattr(text_config(config), self.kv_heads_key, kv_heads)

    def target_config(self, config: Any, kv_heads: int) -> Any:
        """The converted model's config: Transformers' own class, or kvslim's hosted one."""
        import copy

        if self.hosted:
            from ..modeling.hosted import hosted_config

            return hosted_config(self.hosted, config, kv_heads)
        out = copy.deepcopy(config)
        self.set_kv_heads(out, kv_heads)
        return out


@dataclass(frozen=True)
class FusedQKVAdapter(AttentionAdapter):
    """One projection computes [q; k; v] (rows in that order, e.g. Phi-3's qkv_proj). `conv1d`:
    weights are stored in x out (GPT-2's Conv1D) and are transposed on the way in and out."""

    qkv_proj: str = "self_attn.qkv_proj"
    conv1d: bool = False

    def required(self, layer: int) -> list[str]:
        return [self.tensor_name(layer, self.qkv_proj), self.tensor_name(layer, self.o_proj)]

    def split_qkv(self, t, layout: AttentionLayout) -> list:
        """Rows of the fused projection (weight or bias) as [q, k, v]."""
        hd = layout.head_dim
        return t.split([layout.num_heads * hd, layout.num_kv_heads * hd, layout.num_kv_heads * hd])

    def _get(self, reader, layer: int, module: str, kind: str = "weight"):
        name = self.tensor_name(layer, module, kind)
        if name not in reader.keys():
            return None
        t = reader.get(name)
        return t.T if self.conv1d and kind == "weight" else t

    def _put(self, t):
        return t.T.contiguous() if self.conv1d else t

    def read(self, reader, layer: int, layout: AttentionLayout):
        q_w, k_w, v_w = self.split_qkv(self._get(reader, layer, self.qkv_proj), layout)
        bias = self._get(reader, layer, self.qkv_proj, "bias")
        q_b, k_b, v_b = self.split_qkv(bias, layout) if bias is not None else (None, None, None)
        return AttentionWeights(q_w=q_w, k_w=k_w, v_w=v_w, o_w=self._get(reader, layer, self.o_proj),
                                q_b=q_b, k_b=k_b, v_b=v_b)

    def write(self, w, layer: int) -> dict:
        out = {self.tensor_name(layer, self.qkv_proj): self._put(torch.cat([w.q_w, w.k_w, w.v_w])),
               self.tensor_name(layer, self.o_proj): self._put(w.o_w)}
        if w.q_b is not None:
            out[self.tensor_name(layer, self.qkv_proj, "bias")] = torch.cat([w.q_b, w.k_b, w.v_b])
        return out


@dataclass(frozen=True)
class Phi3Adapter(FusedQKVAdapter):
    """Phi-3: fused qkv_proj, and a fused MLP that DeepseekV3 (the MLA target) keeps separate."""

    def deepseek_layer_tensors(self, reader, layer: int) -> tuple[dict, set]:
        # Phi-3's fused MLP input [gate; up] is DeepseekV3's gate_proj and up_proj
        name = self.tensor_name(layer, "mlp.gate_up_proj")
        gate, up = reader.get(name).chunk(2)
        return {self.tensor_name(layer, "mlp.gate_proj"): gate, self.tensor_name(layer, "mlp.up_proj"): up}, {name}


@dataclass(frozen=True)
class GPT2Adapter(FusedQKVAdapter):
    """GPT-2: fused c_attn and c_proj are Conv1D (weight stored as in x out), learned positions."""

    base_path: str = "transformer"
    layers_path: str = "transformer.h"
    qkv_proj: str = "attn.c_attn"
    o_proj: str = "attn.c_proj"
    q_proj: str = "attn.c_attn"  # with an MLA latent, c_attn computes only the queries
    attention_module: str = "attn"
    rope_layout: str = "none"
    conv1d: bool = True
    hosted: str | None = "gpt2"

    def layout(self, config: Any) -> AttentionLayout:
        heads = config.n_head
        kv = getattr(config, "num_key_value_heads", None) or heads
        return AttentionLayout(config.n_layer, heads, kv, config.n_embd // heads, config.n_embd)


@dataclass(frozen=True)
class GPTNeoXAdapter(FusedQKVAdapter):
    """GPT-NeoX/Pythia: fused query_key_value interleaved per head ([q_h; k_h; v_h] for each head),
    partial rotary. The converted model (kvslim's class) stores [all q; k heads; v heads]."""

    base_path: str = "gpt_neox"
    layers_path: str = "gpt_neox.layers"
    qkv_proj: str = "attention.query_key_value"
    o_proj: str = "attention.dense"
    attention_module: str = "attention"
    hosted: str | None = "gpt_neox"

    def output_name(self, name: str) -> str:
        # Transformers renames GPT-NeoX's embed_out to lm_head for its own class name only
        return "lm_head." + name[len("embed_out."):] if name.startswith("embed_out.") else name

    def split_qkv(self, t, layout: AttentionLayout) -> list:
        if self.stored_as_hosted or layout.num_kv_heads != layout.num_heads:  # kvslim's class: plain [q; k; v]
            return super().split_qkv(t, layout)
        per_head = t.reshape(layout.num_heads, 3, layout.head_dim, *t.shape[1:])  # Transformers' interleaving
        return [per_head[:, j].reshape(layout.num_heads * layout.head_dim, *t.shape[1:]) for j in range(3)]


@dataclass(frozen=True)
class OPTAdapter(AttentionAdapter):
    """OPT: separate projections with biases, learned positions (offset 2), out_proj."""

    base_path: str = "model.decoder"
    layers_path: str = "model.decoder.layers"
    o_proj: str = "self_attn.out_proj"
    rope_layout: str = "none"
    hosted: str | None = "opt"


@dataclass(frozen=True)
class BertAdapter(AttentionAdapter):
    """BERT/RoBERTa encoders (AutoModel checkpoints): bidirectional, learned positions."""

    base_path: str = ""
    layers_path: str = "encoder.layer"
    q_proj: str = "attention.self.query"
    k_proj: str = "attention.self.key"
    v_proj: str = "attention.self.value"
    o_proj: str = "attention.output.dense"
    attention_module: str = "attention"
    rope_layout: str = "none"
    model_kind: str = "base"
    hosted: str | None = "bert"


def text_config(config: Any) -> Any:
    """The config that holds the decoder's attention fields (multimodal configs nest it)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


_REGISTRY: dict[str, AttentionAdapter] = {}


def register_adapter(adapter: AttentionAdapter) -> AttentionAdapter:
    for model_type in adapter.model_types:
        _REGISTRY[model_type] = adapter
    return adapter


def registered_adapter(model_type: str) -> AttentionAdapter | None:
    """The adapter registered for `model_type` as a source, or None."""
    return _REGISTRY.get(model_type)


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


# What kvslim writes that is not a source it converts: named (layers, attention modules) as Llama is
_OUTPUT_TYPES = {"deepseek_v3": "llama"}


def _hosted_source(model_type: str) -> str | None:
    """The source model_type of a kvslim-hosted class's model_type (kvslim_<source>), else None."""
    from ..modeling.hosted import hosted_name

    return hosted_name(model_type)


def adapter_for(model_type: str) -> AttentionAdapter:
    """The adapter that describes a model of `model_type`: a source, a hosted `kvslim_<source>`
    class, or a DeepseekV3 MLA output."""
    model_type = _hosted_source(model_type) or model_type
    return get_adapter(_OUTPUT_TYPES.get(model_type, model_type))


def class_uses_kv_heads(model_type: str) -> bool:
    """False for Transformers classes that ignore `num_key_value_heads` (GPT-2, GPT-NeoX, OPT,
    BERT, RoBERTa: their cache holds every head); kvslim's hosted classes and others honour it."""
    adapter = _REGISTRY.get(model_type)
    return adapter is None or adapter.hosted is None


def source_adapter(config: Any) -> AttentionAdapter:
    """The adapter that reads a conversion source: a registered architecture, or kvslim's hosted
    GQA/MHA output of one (converted again, e.g. after uptraining)."""
    model_type = config.model_type
    if getattr(text_config(config), "kv_lora_rank", None) is not None:
        raise ConversionError(f"'{model_type}' is already multi-head latent attention; convert its source model "
                              "instead.")
    hosted_source = _hosted_source(model_type)
    if hosted_source is not None:
        return replace(get_adapter(hosted_source), stored_as_hosted=True)
    return get_adapter(model_type)


def attention_module_names(model) -> list[str]:
    """Every layer's attention module in `model` (a loaded source or conversion), by module name."""
    adapter = adapter_for(model.config.model_type)
    return [adapter.prefix(i) + adapter.attention_module for i in range(adapter.layout(model.config).num_layers)]


def get_adapter(model_type: str) -> AttentionAdapter:
    try:
        return _REGISTRY[model_type]
    except KeyError:
        raise ConversionError(
            f"Unsupported architecture '{model_type}'. kvslim can convert: "
            f"{', '.join(supported_model_types())}."
        ) from None


# Llama-style attention: separate q/k/v/o projections, rotate-half RoPE. Biases (Qwen2) are
# picked up from the checkpoint itself, so one adapter covers with- and without-bias variants.
register_adapter(AttentionAdapter("llama", ("llama", "mistral", "qwen2"), deepseek_mla=True, gguf_lazy=True,
                                  gguf_permuted_qk=("llama", "mistral")))
# MoE with softmax routers (and Qwen2-MoE's shared expert) that DeepseekV3's MoE cannot express
register_adapter(AttentionAdapter("llama_moe", ("mixtral", "qwen2_moe"), hosted_mla=True))
# GeGLU, soft-capping, (1 + weight) norms: MLA keeps the class
register_adapter(AttentionAdapter("gemma", ("gemma", "gemma2"), hosted_mla=True))
# Per-head q/k RMSNorm before RoPE.
register_adapter(AttentionAdapter("qwen3", ("qwen3", "qwen3_moe"), qk_norm=True, hosted_mla=True))
register_adapter(AttentionAdapter("gemma3", ("gemma3_text",), qk_norm=True, qk_norm_offset=1.0, hosted_mla=True))
# DeepseekV3 with RoPE on the whole head; the hosted class for partial rotary
register_adapter(Phi3Adapter("phi3", ("phi3",), deepseek_mla=True, hosted_mla=True))
# Transformers' classes ignore num_key_value_heads here: the output uses kvslim's hosted class.
register_adapter(GPT2Adapter("gpt2", ("gpt2",)))
register_adapter(GPTNeoXAdapter("gpt_neox", ("gpt_neox",)))
register_adapter(OPTAdapter("opt", ("opt",)))
register_adapter(BertAdapter("bert", ("bert",)))
register_adapter(BertAdapter("roberta", ("roberta",), hosted="roberta"))
