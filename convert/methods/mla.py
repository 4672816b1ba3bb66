"""MLA: keys and values of all heads from one cached low-rank latent, plus a shared RoPE key.

Three output forms, chosen by the architecture (the adapter's `deepseek_mla` / hosted classes):
- `DeepseekMLA`: sources whose blocks DeepseekV3 reproduces (Llama, Mistral, Qwen2, Phi-3 with
  RoPE on the whole head) become DeepseekV3ForCausalLM checkpoints;
- `LatentRopeMLA`: the others with RoPE keep their class with kvslim's latent attention;
- `LatentMLA`: models without rotary embeddings (GPT-2, OPT, BERT): the latent alone.
The math is in convert/mla.py.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace

import torch
from tqdm.auto import tqdm

from ..adapters import text_config
from ..allocation import LayerChoices, allocate
from ..errors import ConversionError
from ..gqa import head_views, pair_indices, query_key_views
from ..mla import (
    INITS,
    ROPE_STRATEGIES,
    MLAShape,
    budget_elements,
    check_rank,
    check_shape,
    constant_fit,
    convert_attention_latent,
    convert_attention_latent_rope,
    convert_attention_mla,
    latent_errors,
    latent_rope_layer_errors,
    max_latent_rank,
    rope_progression,
    rotation_keep_factor,
    shape_for_budget,
    shared_rope_key,
)
from ..records import DEEPSEEK, LATENT, LATENT_ROPE, MLADetails, MLARecord, kv_bytes_per_token, span
from .base import ConversionMethod, LayerOutput

# DeepseekV3 tensors that implement the latent-norm anchors: the refinement leaves them alone.
ANCHORED = ("kv_a_layernorm", "kv_a_proj_with_mqa.bias", "q_a_layernorm", "q_a_proj")
# Without biases (vLLM) the anchor row sits in kv_a_proj_with_mqa's weight: one huge row would set
# the per-tensor step size of every other row, so the down-projection stays as solved.
ANCHORED_BIAS_FREE = ("kv_a_proj_with_mqa",)
RUNTIMES = ("transformers", "vllm")
# per-layer: the hosted RoPE class spreads --kv-budget over layers and between RoPE key and latent
# (convert/allocation.py); uniform: every layer gets the same shape. DeepseekV3 has one shape.
ALLOCATIONS = ("per-layer", "uniform")
# (kv_lora_rank, qk_rope_head_dim) vLLM's MLA kernels take: FlashMLA and the CPU decode kernel
# need 512 + 64 = 576 cached elements per token and layer; some GPU backends also take 256 + 64.
VLLM_SHAPES = ((512, 64), (256, 64))


@dataclass(frozen=True)
class MLAOptions:
    kv_budget: float | None = None  # fraction of the source's KV bytes; or kv_rank (+ rope_dim)
    kv_rank: int | None = None
    rope_dim: int | None = None
    mla_init: str = "whitened"
    rope_strategy: str = "rotate"
    runtime: str = "transformers"  # vllm: a DeepseekV3 checkpoint inside vLLM's kernel constraints
    allocation: str | None = None  # None: the output class's default (its DEFAULT_ALLOCATION)

    def __post_init__(self):
        if self.allocation is not None and self.allocation not in ALLOCATIONS:
            raise ConversionError(f"Unknown --allocation '{self.allocation}'; valid: {', '.join(ALLOCATIONS)}.")
        if self.runtime not in RUNTIMES:
            raise ConversionError(f"Unknown --runtime '{self.runtime}'; valid: {', '.join(RUNTIMES)}.")
        if self.mla_init not in INITS:
            raise ConversionError(f"Unknown --mla-init '{self.mla_init}'; valid: {', '.join(INITS)}.")
        if self.rope_strategy not in ROPE_STRATEGIES:
            raise ConversionError(f"Unknown --rope-strategy '{self.rope_strategy}'; valid: {', '.join(ROPE_STRATEGIES)}.")

    def allocates(self, default: str) -> bool:
        """Whether --kv-budget is spread over layers (`default`: the output class's choice when
        --allocation is not given). The allocation ranks shapes by the error the ``whitened`` latent
        minimises; ``pca``/``svd`` reproduce TransMLA/MHA2MLA, one rank for all layers."""
        return (self.allocation or default) == "per-layer" and self.kv_budget is not None and self.mla_init == "whitened"

    def uses_budget(self, rank_usage: str, required: bool = True) -> bool:
        """At most one of --kv-budget (a fraction in (0, 1]) and --kv-rank, exactly one when
        `required`; True when it is the budget."""
        if required and self.kv_budget is None and self.kv_rank is None:
            raise ConversionError(f"--to mla needs --kv-budget F, or {rank_usage}.")
        if self.kv_budget is not None and self.kv_rank is not None:
            raise ConversionError(f"Give either --kv-budget or {rank_usage}, not both.")
        if self.kv_budget is not None and not 0 < self.kv_budget <= 1:
            raise ConversionError(f"--kv-budget {self.kv_budget} must be a fraction in (0, 1].")
        return self.kv_budget is not None

    def shape(self, layout, *, rotary_dims: int | None = None, reserved: int = 1,
              reserved_what: str = "anchor") -> MLAShape:
        """Latent rank and RoPE dims from --kv-budget, or --kv-rank [--rope-dim], checked. `reserved`:
        other cached elements per token and layer (see shape_for_budget)."""
        rotary_dims = rotary_dims or layout.head_dim
        if self.uses_budget("--kv-rank R [--rope-dim D]"):
            shape = shape_for_budget(self.kv_budget, layout, layout.hidden_size, self.rope_dim,
                                     rotary_dims=rotary_dims, reserved=reserved, reserved_what=reserved_what)
        else:
            shape = MLAShape(self.kv_rank, self.rope_dim if self.rope_dim is not None else min(rotary_dims, 64))
        check_shape(shape, layout, layout.hidden_size, rotary_dims)
        return shape


class _MLA(ConversionMethod):
    targets = ("mla",)
    Options = MLAOptions

    def _record(self, common: dict, details: MLADetails) -> MLARecord:
        layout = self.job.layout
        return MLARecord(**common, method="mla", kv_heads_after=1, mla=details,
                         kv_bytes_per_token_after=kv_bytes_per_token(
                             layout.num_layers, details.cache_elements_per_layer, self.job.weight_dtype))

    def _config_dtype(self, config):
        if self.job.settings.out_dtype is not None:
            config.dtype = self.job.settings.out_dtype
        return config


# -- DeepseekV3 ----------------------------------------------------------------------------------


def source_frequencies(config) -> torch.Tensor:
    text = text_config(config)
    rope = getattr(text, "rope_parameters", None) or {"rope_type": "default", "rope_theta": getattr(text, "rope_theta", 10000.0)}
    if rope.get("rope_type", "default") != "default":
        raise ConversionError(
            f"MLA conversion supports plain RoPE; this model uses rope_type '{rope.get('rope_type')}', whose "
            "frequencies DeepseekV3's rotary embedding cannot reproduce."
        )
    hd = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return 1.0 / (rope["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))


def vllm_shape(options: MLAOptions, layout) -> tuple[MLAShape, int]:
    """(shape, zero latent rows) for --runtime vllm: one of VLLM_SHAPES, from --kv-rank (the
    cached latent, anchor included), --kv-budget, or 512 + 64 when neither is given."""
    source = 2 * layout.num_kv_heads * layout.head_dim
    valid = [r + p for r, p in VLLM_SHAPES]
    shapes = "; ".join(f"--kv-rank {r} --rope-dim {p} ({r + p} elements, --kv-budget {(r + p) / source:.4f})"
                       for r, p in VLLM_SHAPES)
    if layout.head_dim < 64:
        raise ConversionError(f"--runtime vllm needs a head dim of at least 64 (vLLM's MLA kernels take a 64-dim "
                              f"RoPE key from each head); this model's is {layout.head_dim}. Use --runtime "
                              "transformers.")
    if options.rope_dim not in (None, 64):
        raise ConversionError(f"--runtime vllm uses a 64-dim RoPE key; --rope-dim {options.rope_dim} is not one "
                              f"vLLM's kernels take. Valid shapes: {shapes}.")
    latent, rope = VLLM_SHAPES[0]
    if options.uses_budget("--kv-rank", required=False):
        elements = int(math.floor(options.kv_budget * source + 1e-9))
        if elements not in valid:
            nearest = min(VLLM_SHAPES, key=lambda s: abs(s[0] + s[1] - elements))
            raise ConversionError(
                f"--runtime vllm: --kv-budget {options.kv_budget:g} gives {elements} cache elements per token and "
                f"layer (of the source's {source}); vLLM's kernels take {' or '.join(map(str, valid))}. Nearest: "
                f"--kv-budget {(nearest[0] + nearest[1]) / source:.4f} ({nearest[0]} + {nearest[1]}). Valid "
                f"shapes: {shapes}.")
        latent = VLLM_SHAPES[valid.index(elements)][0]
    elif options.kv_rank is not None:
        if options.kv_rank not in [r for r, _ in VLLM_SHAPES]:
            raise ConversionError(f"--runtime vllm: --kv-rank {options.kv_rank} is not a latent vLLM's kernels "
                                  f"take. Valid shapes: {shapes}.")
        latent = options.kv_rank
    rank = min(latent - 1, max_latent_rank(layout, layout.hidden_size))  # one latent element is the anchor
    return MLAShape(rank, rope), latent - 1 - rank


def deepseek_config(source_config, shape: MLAShape, window: tuple[int, int], query_bias: bool, *,
                    bias_free: bool = False, padding: int = 0):
    """DeepseekV3Config reproducing the source's shape with an MLA attention (`bias_free`: no
    attention biases, the query bias folded into q_proj, for vLLM)."""
    from transformers import DeepseekV3Config

    text = text_config(source_config)
    hd = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    start, stride = window
    if bias_free and start != 0:  # vLLM rewrites any other rope_type to its own scaling
        raise ConversionError("--runtime vllm needs the RoPE frequencies to start at the fastest pair.")
    base = text.rope_parameters["rope_theta"]
    rope_theta = base ** (stride * shape.rope_dim / hd)
    factor = base ** (2 * start / hd)
    rope = {"rope_type": "default", "rope_theta": rope_theta} if start == 0 else \
        {"rope_type": "linear", "rope_theta": rope_theta, "factor": factor}
    return DeepseekV3Config(
        vocab_size=text.vocab_size, hidden_size=text.hidden_size, intermediate_size=text.intermediate_size,
        moe_intermediate_size=text.intermediate_size, num_hidden_layers=text.num_hidden_layers,
        num_attention_heads=text.num_attention_heads, num_key_value_heads=text.num_attention_heads,
        n_shared_experts=1, n_routed_experts=1, num_experts_per_tok=1, n_group=1, topk_group=1,
        first_k_dense_replace=text.num_hidden_layers,  # dense MLP everywhere: no MoE layer is built
        kv_lora_rank=shape.kv_rank + 1 + padding,
        q_lora_rank=(text.hidden_size + 1) if query_bias and not bias_free else None,
        qk_rope_head_dim=shape.rope_dim, qk_nope_head_dim=hd, v_head_dim=hd,
        hidden_act=text.hidden_act, max_position_embeddings=text.max_position_embeddings,
        rms_norm_eps=text.rms_norm_eps, rope_parameters=rope, rope_interleave=True, attention_bias=not bias_free,
        attention_dropout=getattr(text, "attention_dropout", 0.0), tie_word_embeddings=text.tie_word_embeddings,
        bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id, pad_token_id=getattr(text, "pad_token_id", None),
        initializer_range=getattr(text, "initializer_range", 0.02),
        architectures=["DeepseekV3ForCausalLM"],  # tools that dispatch on it (vLLM, TGI, the Hub) see a causal LM
    )


def source_stream(job, runner, label: str):
    """(index, source attention weights, attention input moment) of every layer, with the
    calibration stream advanced through the *source* layers (on a copy of the runner): a pass that
    decides something for all layers before the first one is converted."""
    layout, source_layers = job.layout, list(runner.layers)
    probe = copy.copy(runner)
    probe.hidden = list(runner.hidden)
    for i in tqdm(range(layout.num_layers), desc=label, unit="layer", disable=not job.settings.progress):
        yield i, job.adapter.read(job.src.reader, i, layout), probe.attention_input_moment(i, job.adapter.attention_module)
        probe.advance(i, source_layers[i], {})


class DeepseekMLA(_MLA):
    """Output: DeepseekV3ForCausalLM (q_lora_rank None unless the source has a query bias, dense MLP
    in every layer, no MoE), loaded by plain `AutoModelForCausalLM.from_pretrained`."""

    @classmethod
    def applies(cls, adapter, config) -> bool:
        return adapter.deepseek_mla and adapter.rope(config) == adapter.rope_layout

    def check(self) -> None:
        job = self.job
        self.vllm = self.options.runtime == "vllm"
        self.shape, self.padding = vllm_shape(self.options, job.layout) if self.vllm else \
            (self.options.shape(job.layout), 0)
        self.theta = source_frequencies(job.src.config)
        self.constant_errors: list[float] = []
        self.query_bias = job.adapter.tensor_name(0, job.adapter.q_proj, "bias") in job.src.reader.keys()

    def output_config(self, runner):
        # Pass 1 (source stream): one RoPE frequency progression for all layers, because DeepseekV3
        # has a single rotary embedding.
        job, layout = self.job, self.job.layout
        gains = torch.zeros(layout.head_dim // 2, dtype=torch.float64)
        for _, weights, cov in source_stream(job, runner, "MLA: choosing RoPE frequencies"):
            gains += self._frequency_gain(weights, cov)
        self.window = rope_progression(gains, self.shape.rope_dim // 2)
        return self._config_dtype(deepseek_config(job.src.config, self.shape, self.window, self.query_bias,
                                                  bias_free=self.vllm, padding=self.padding))

    def _frequency_gain(self, weights, cov) -> torch.Tensor:
        """Per-frequency benefit of keeping a pair under RoPE (the criterion the layer conversion uses)."""
        layout, rope_layout = self.job.layout, self.job.adapter.rope_layout
        q, k = query_key_views(weights, layout)
        *_, gain = shared_rope_key(q, k, cov, rotation_keep_factor(self.theta, self.job.settings.calib_seq_len),
                                   self.options.rope_strategy, *pair_indices(layout.head_dim, rope_layout))
        return gain if self.options.rope_strategy == "partial" else gain / gain.sum().clamp(min=1e-30)

    def prepare_layers(self, target_model) -> None:
        self.rotary = target_model.model.rotary_emb.to(self.job.settings.device)

    def new_record(self, common: dict) -> MLARecord:
        shape, layout = self.shape, self.job.layout
        record = self._record(common, MLADetails(
            DEEPSEEK, shape.kv_rank, shape.rope_dim, shape.cache_elements + self.padding, self.options.mla_init,
            self.options.rope_strategy, latent_anchor=1, context_for_beta=self.job.settings.calib_seq_len,
            rope_frequencies={"start": self.window[0], "stride": self.window[1]},
            query_bias_via_q_lora=self.query_bias and not self.vllm, runtime=self.options.runtime,
            latent_padding=self.padding or None,
            allocation={"kind": "uniform", "rule": "DeepseekV3 has one kv_lora_rank and qk_rope_head_dim for all layers"}))
        if self.vllm:
            source = 2 * layout.num_kv_heads * layout.head_dim
            record.notes.append(
                "vLLM runtime: no bias tensors (vLLM's DeepSeek attention has none); the latent's anchor"
                + (" and the source's biases" if self.query_bias or self._has_kv_bias() else "")
                + " read a constant off the input by least squares (u.x ~ 1), so the closed form is approximate"
                " where u.x varies; refinement absorbs part of it.")
            if shape.cache_elements + self.padding > source:
                record.notes.append(
                    f"vLLM's kernels cache {shape.cache_elements + self.padding} elements per token and layer, more "
                    f"than this source's {source} (K and V): the latent is padded with {self.padding} zero rows "
                    "and the cache costs more memory than the source's, not less.")
        return record

    def _has_kv_bias(self) -> bool:
        adapter = self.job.adapter
        return adapter.tensor_name(0, adapter.k_proj, "bias") in self.job.src.reader.keys()

    def progress_label(self) -> str:
        return f"MLA ({self.options.mla_init}, rank {self.shape.kv_rank}, rope {self.shape.rope_dim})"

    def convert_layer(self, index, weights, cov, runner) -> LayerOutput:
        job, adapter = self.job, self.job.adapter
        layer = convert_attention_mla(
            weights, job.layout, self.shape, self.theta, cov=cov, init=self.options.mla_init,
            rope_strategy=self.options.rope_strategy, context=job.settings.calib_seq_len,
            source_scaling=job.layout.head_dim ** -0.5, rope_layout=adapter.rope_layout, rope_window=self.window,
            bias_free=self.vllm, latent_rows=self.shape.kv_rank + self.padding)
        if self.vllm:
            self.constant_errors.append(round(constant_fit(cov.double()), 6))
        attn_prefix = f"{adapter.prefix(index)}{adapter.attention_module}."
        renamed, replaced = adapter.deepseek_layer_tensors(job.src.reader, index)
        dropped = set(adapter.write(weights, index)) | replaced
        return LayerOutput(layer.tensors(attn_prefix), extra=renamed, call=self._target_call(runner, index),
                           frozen=ANCHORED_BIAS_FREE if self.vllm else ANCHORED,
                           drops=lambda name: name in dropped or name.startswith(attn_prefix))

    def finish(self, record: MLARecord) -> None:
        if self.vllm:
            record.mla = replace(record.mla, constant_fit_error=self.constant_errors)

    def _target_call(self, runner, index: int) -> dict:
        """The source layer's arguments with DeepseekV3's own rotary embeddings."""
        call = dict(runner.layer_kwargs[index])
        hidden = runner.hidden[0]
        positions = call.get("position_ids")
        if positions is None:
            positions = torch.arange(hidden.shape[1], device=hidden.device)[None]
        with torch.no_grad():
            call["position_embeddings"] = self.rotary(hidden, positions)
        return call


# -- kvslim's hosted classes -----------------------------------------------------------------------


class _HostedMLA(_MLA):
    """MLA in the source's own class with kvslim's latent attention (modeling/hosted/)."""

    def check(self) -> None:
        if self.options.runtime == "vllm":
            raise ConversionError(
                f"--runtime vllm writes DeepseekV3 checkpoints; '{self.job.src.model_type}' converts to kvslim's "
                f"hosted class {self.hosted_class()!r} (its blocks are not DeepseekV3's), which stock vLLM does not "
                "serve. Use --runtime transformers.")
        self.check_shape()

    def check_shape(self) -> None:
        raise NotImplementedError

    def hosted_class(self) -> str:
        return self.job.adapter.mla_hosted_class(self.job.src.model_type)

    def _allocation_record(self, estimated_errors) -> dict:
        if self.per_layer:
            return {"kind": "per-layer", "rule": "least summed estimated relative error (score + output) within the "
                    "total cache of --kv-budget", "estimated_error": estimated_errors}
        if self.options.kv_budget is None or self.options.rope_dim is not None:
            return {"kind": "uniform", "rule": "--kv-rank/--rope-dim fix the shape"}
        if self.options.mla_init != "whitened":
            return {"kind": "uniform", "rule": f"--mla-init {self.options.mla_init} (TransMLA/MHA2MLA: one rank for all "
                    "layers)"}
        if self.options.allocation is None:
            return {"kind": "uniform", "rule": self.UNIFORM_BY_DEFAULT}
        return {"kind": "uniform", "rule": "--allocation uniform"}

    def _hosted_config(self, kv_heads: int, **latent_fields):
        from ...modeling.hosted import hosted_config

        config = hosted_config(self.hosted_class(), self.job.src.config, kv_heads)
        for name, value in latent_fields.items():
            setattr(config, name, value)
        return self._config_dtype(config)


class LatentMLA(_HostedMLA):
    """Hosted class, no rotary embeddings (GPT-2, OPT, BERT): keys and values of all heads from one
    cached latent (modeling/hosted/kvslim_attention.py)."""

    # measured (benchmarks/results/encoder_conversion_mla_allocation.md): on all-MiniLM-L6-v2 at 1/4,
    # per-layer ranks gave mean cosine 0.9890 / 0.9920 (closed form / refined) against 0.9895 / 0.9923
    # with one rank, so one rank stays the default here
    DEFAULT_ALLOCATION = "uniform"
    UNIFORM_BY_DEFAULT = ("the default without RoPE (per-layer ranks did not beat one rank on all-MiniLM-L6-v2); "
                          "--allocation per-layer spreads the budget")

    @classmethod
    def applies(cls, adapter, config) -> bool:
        return adapter.mla_hosted_class(config.model_type) is not None and adapter.rope(config) == "none"

    def check_shape(self) -> None:
        layout = self.job.layout
        if self.options.rope_dim is not None:
            raise ConversionError(f"--rope-dim does not apply: '{self.job.src.model_type}' has no rotary embeddings.")
        rank = self.options.kv_rank
        if self.options.uses_budget("--kv-rank R"):
            rank = min(budget_elements(self.options.kv_budget, layout), max_latent_rank(layout, layout.hidden_size))
        check_rank(rank, layout, layout.hidden_size)
        self.per_layer = self.options.allocates(self.DEFAULT_ALLOCATION)
        self.ranks = [rank] * layout.num_layers
        self.estimated_errors: list[float] | None = None

    def output_config(self, runner):
        if self.per_layer:
            self.ranks = self._allocate(runner)
        return self._hosted_config(self.job.layout.num_heads,
                                   kv_lora_rank=self.ranks if self.per_layer else self.ranks[0])

    def _allocate(self, runner) -> list[int]:
        """Per-layer latent ranks with the total cache of --kv-budget, least summed estimated
        error (`latent_errors`, on the source's calibration stream)."""
        job, layout = self.job, self.job.layout
        max_rank = max_latent_rank(layout, layout.hidden_size)
        choices = []
        for _, weights, cov in source_stream(job, runner, "MLA: allocating the cache over layers"):
            q, k, v, o = head_views(weights, layout)
            errors = latent_errors(q, k, v, o, cov.double())
            layer = LayerChoices()
            for rank in range(1, max_rank + 1):
                layer.offer(rank, float(errors[rank]), (rank, float(errors[rank])))
            choices.append(layer)
        picked = allocate(choices, layout.num_layers * budget_elements(self.options.kv_budget, layout))
        self.estimated_errors = [round(e, 6) for _, e in picked]
        return [rank for rank, _ in picked]

    def new_record(self, common: dict) -> MLARecord:
        ranks = self.ranks if self.per_layer else self.ranks[0]
        return self._record(common, MLADetails(LATENT, ranks, 0, ranks, self.options.mla_init,
                                               "none (no rotary embeddings)",
                                               allocation=self._allocation_record(self.estimated_errors)))

    def progress_label(self) -> str:
        return f"MLA ({self.options.mla_init}, rank {span(self.ranks)})"

    def convert_layer(self, index, weights, cov, runner) -> LayerOutput:
        adapter = self.job.adapter
        latent = convert_attention_latent(weights, self.job.layout, self.ranks[index], cov=cov,
                                          init=self.options.mla_init)
        replaced = set(adapter.write(weights, index))
        return LayerOutput(adapter.write_latent(weights, latent, index), drops=replaced.__contains__)


def layer_frequencies(call: dict, re: torch.Tensor) -> torch.Tensor:
    """The source's RoPE frequency of each pair in this layer, read off the cos/sin the model
    passes it (position 1): covers per-layer RoPE (Gemma 3 local/global) and any scaling rule."""
    cos, sin = call["position_embeddings"]
    cos, sin = cos.reshape(-1, *cos.shape[-2:])[0, 1].double(), sin.reshape(-1, *sin.shape[-2:])[0, 1].double()
    return torch.atan2(sin[re], cos[re]).cpu()  # weight math runs on the CPU


class LatentRopeMLA(_HostedMLA):
    """Hosted class with RoPE (Qwen3, Gemma, GPT-NeoX, Phi-3 partial rotary, the MoE models): the
    latent plus one shared RoPE key per layer (`LatentRopeAttention`), and for q/k-norm models one
    key-norm gain per source KV head."""

    DEFAULT_ALLOCATION = "per-layer"
    UNIFORM_BY_DEFAULT = ""  # never: per-layer is the default

    @classmethod
    def applies(cls, adapter, config) -> bool:
        return adapter.mla_hosted_class(config.model_type) is not None and adapter.rope(config) != "none"

    def check_shape(self) -> None:
        job, layout = self.job, self.job.layout
        self.rope_layout = job.adapter.rope(job.src.config)
        self.re, _ = pair_indices(layout.head_dim, self.rope_layout)
        self.scales = layout.num_kv_heads if job.adapter.qk_norm else 0  # one key-norm gain per source KV head
        self.shape = self.options.shape(layout, rotary_dims=2 * self.re.shape[0], reserved=self.scales,
                                        reserved_what="key-norm scales")
        self.eps = getattr(text_config(job.src.config), "rms_norm_eps", 1e-6)
        self.windows: list = []
        # --kv-rank / --rope-dim fix the shape of every layer; a bare --kv-budget is spread over them
        self.per_layer = self.options.allocates(self.DEFAULT_ALLOCATION) and self.options.rope_dim is None
        self.shapes = [self.shape] * layout.num_layers
        self.estimated_errors: list[float] | None = None

    def output_config(self, runner):
        if self.per_layer:
            self.shapes = self._allocate(runner)
        ranks, ropes = [s.kv_rank for s in self.shapes], [s.rope_dim for s in self.shapes]
        return self._hosted_config(self.job.layout.num_kv_heads,
                                   kv_lora_rank=ranks if self.per_layer else ranks[0],
                                   qk_rope_head_dim=ropes if self.per_layer else ropes[0])

    def _allocate(self, runner) -> list[MLAShape]:
        """Per-layer (rank, RoPE dims) with the total cache of the uniform shape, least summed
        estimated error (`latent_rope_errors`, on the source's calibration stream)."""
        job, layout = self.job, self.job.layout
        pairs = self.re.shape[0]
        step = max(1, pairs // 16)
        pair_counts = sorted({*range(step, pairs + 1, step), 1, pairs})
        max_rank = max_latent_rank(layout, layout.hidden_size)
        choices = []
        for i, weights, cov in source_stream(job, runner, "MLA: allocating the cache over layers"):
            theta = layer_frequencies(runner.layer_kwargs[i], self.re)
            errors = latent_rope_layer_errors(weights, layout, theta, cov, pair_counts,
                                              rope_strategy=self.options.rope_strategy,
                                              context=job.settings.calib_seq_len, rope_layout=self.rope_layout,
                                              norm_eps=self.eps)
            layer = LayerChoices()
            for p, err in errors.items():
                for rank in range(1, max_rank + 1):
                    layer.offer(2 * p + rank + self.scales, float(err[rank]), (rank, 2 * p, float(err[rank])))
            choices.append(layer)
        total = layout.num_layers * budget_elements(self.options.kv_budget, layout)
        picked = allocate(choices, total)
        self.estimated_errors = [round(e, 6) for _, _, e in picked]
        return [MLAShape(rank, rope) for rank, rope, _ in picked]

    def prepare_layers(self, target_model) -> None:
        self.model_class = type(target_model.get_submodule(self.job.adapter.layers_path)[0]).__module__

    def new_record(self, common: dict) -> MLARecord:
        qk_norm = ("exact at full rank: queries keep the source's q-norm; the latent factors the key before its "
                   "norm and the cache holds each token's key-norm gain (one per source KV head)"
                   if self.job.adapter.qk_norm else "none")
        ranks, ropes = [s.kv_rank for s in self.shapes], [s.rope_dim for s in self.shapes]
        cache = [s.kv_rank + s.rope_dim + self.scales for s in self.shapes]
        allocation = self._allocation_record(self.estimated_errors)
        return self._record(common, MLADetails(
            LATENT_ROPE, ranks if self.per_layer else ranks[0], ropes if self.per_layer else ropes[0],
            cache if self.per_layer else cache[0], self.options.mla_init, self.options.rope_strategy,
            key_norm_scales=self.scales, context_for_beta=self.job.settings.calib_seq_len,
            model_class=self.model_class, qk_norm=qk_norm, allocation=allocation))

    def progress_label(self) -> str:
        if self.per_layer:
            ranks, ropes = [s.kv_rank for s in self.shapes], [s.rope_dim for s in self.shapes]
            return f"MLA ({self.options.mla_init}, per layer: rank {min(ranks)}-{max(ranks)}, rope {min(ropes)}-{max(ropes)})"
        return f"MLA ({self.options.mla_init}, rank {self.shape.kv_rank}, rope {self.shape.rope_dim})"

    def convert_layer(self, index, weights, cov, runner) -> LayerOutput:
        job, adapter = self.job, self.job.adapter
        o_bias = adapter.tensor_name(index, adapter.o_proj, "bias")
        if o_bias in job.src.reader.keys():
            weights.o_b = job.src.reader.get(o_bias)
        theta = layer_frequencies(runner.layer_kwargs[index], self.re)
        shape = self.shapes[index]
        tensors, window = convert_attention_latent_rope(
            weights, job.layout, shape.kv_rank, shape.rope_dim, theta, cov=cov, init=self.options.mla_init,
            rope_strategy=self.options.rope_strategy, context=job.settings.calib_seq_len,
            rope_layout=self.rope_layout, norm_eps=self.eps)
        self.windows.append(list(window))
        attn_prefix = f"{adapter.prefix(index)}{adapter.attention_module}."
        return LayerOutput({attn_prefix + name: t for name, t in tensors.items()},
                           drops=lambda name: name.startswith(attn_prefix))

    def finish(self, record: MLARecord) -> None:
        record.mla = replace(record.mla, rope_frequencies=[{"start": a, "stride": b} for a, b in self.windows])
