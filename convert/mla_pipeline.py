"""`kvslim.convert(..., to="mla")`: Llama-family checkpoint -> DeepseekV3ForCausalLM checkpoint.

The output loads with plain `AutoModelForCausalLM.from_pretrained` (model_type deepseek_v3,
q_lora_rank None unless the source has a query bias, dense MLP in every layer, no MoE).
"""

from __future__ import annotations

import copy

import torch
from tqdm.auto import tqdm

from .adapters import AttentionAdapter, text_config
from .calibration import LayerwiseRunner, calibration_windows, meta_model
from .errors import ConversionError
from .mla import (
    INITS,
    ROPE_STRATEGIES,
    MLAShape,
    check_rank,
    check_shape,
    convert_attention_mla,
    max_latent_rank,
    rope_progression,
    rotation_keep_factor,
    shape_for_budget,
    shared_rope_key,
)
from .sources import CheckpointSource

# Source architectures whose non-attention blocks DeepseekV3 reproduces exactly (SwiGLU MLP,
# RMSNorm with weight, plain embeddings) and that have no per-head q/k norm. (Phi-3's fused
# gate_up_proj splits into gate_proj and up_proj.)
MLA_SOURCES = ("llama", "mistral", "qwen2", "phi3")
# Tensors that implement the latent-norm anchors: the refinement leaves them alone.
ANCHORED = ("kv_a_layernorm", "kv_a_proj_with_mqa.bias", "q_a_layernorm", "q_a_proj")


def check_budget_or_rank(kv_budget: float | None, kv_rank: int | None, rank_usage: str) -> bool:
    """Exactly one of --kv-budget (a fraction in (0, 1]) and --kv-rank; True when it is the budget."""
    if kv_budget is None and kv_rank is None:
        raise ConversionError(f"--to mla needs --kv-budget F, or {rank_usage}.")
    if kv_budget is not None and kv_rank is not None:
        raise ConversionError(f"Give either --kv-budget or {rank_usage}, not both.")
    if kv_budget is not None and not 0 < kv_budget <= 1:
        raise ConversionError(f"--kv-budget {kv_budget} must be a fraction in (0, 1].")
    return kv_budget is not None


def choose_shape(kv_budget: float | None, kv_rank: int | None, rope_dim: int | None, layout, *,
                 rotary_dims: int | None = None, reserved: int = 1, reserved_what: str = "anchor") -> MLAShape:
    """Latent rank and RoPE dims from --kv-budget, or --kv-rank [--rope-dim], checked. `reserved`:
    other cached elements per token and layer (see shape_for_budget)."""
    rotary_dims = rotary_dims or layout.head_dim
    if check_budget_or_rank(kv_budget, kv_rank, "--kv-rank R [--rope-dim D]"):
        shape = shape_for_budget(kv_budget, layout, layout.hidden_size, rope_dim, rotary_dims=rotary_dims,
                                 reserved=reserved, reserved_what=reserved_what)
    else:
        shape = MLAShape(kv_rank, rope_dim if rope_dim is not None else min(rotary_dims, 64))
    check_shape(shape, layout, layout.hidden_size, rotary_dims)
    return shape


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


def deepseek_config(source_config, shape: MLAShape, window: tuple[int, int], query_bias: bool):
    """DeepseekV3Config reproducing the source's shape with an MLA attention."""
    from transformers import DeepseekV3Config

    text = text_config(source_config)
    hd = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    start, stride = window
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
        kv_lora_rank=shape.kv_rank + 1, q_lora_rank=(text.hidden_size + 1) if query_bias else None,
        qk_rope_head_dim=shape.rope_dim, qk_nope_head_dim=hd, v_head_dim=hd,
        hidden_act=text.hidden_act, max_position_embeddings=text.max_position_embeddings,
        rms_norm_eps=text.rms_norm_eps, rope_parameters=rope, rope_interleave=True, attention_bias=True,
        attention_dropout=getattr(text, "attention_dropout", 0.0), tie_word_embeddings=text.tie_word_embeddings,
        bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id, pad_token_id=getattr(text, "pad_token_id", None),
        initializer_range=getattr(text, "initializer_range", 0.02),
        architectures=["DeepseekV3ForCausalLM"],  # tools that dispatch on it (vLLM, TGI, the Hub) see a causal LM
    )


def convert_mla(src: CheckpointSource, adapter: AttentionAdapter, layout, out, writer_factory, record, *,
                kv_rank, rope_dim, kv_budget, init, rope_strategy, calib_data, calib_samples, calib_seq_len,
                refine_steps, refine_lr, out_dtype, device, progress, started, save):
    from .pipeline import _cast, _refine, copy_non_layer_tensors

    if src.model_type not in MLA_SOURCES:
        from ..modeling.hosted import HOSTED

        raise ConversionError(
            f"MLA conversion of '{src.model_type}' is not supported; supported sources: {', '.join(MLA_SOURCES)} "
            "(written as DeepseekV3: their SwiGLU MLP and RMSNorm map onto it exactly) and "
            f"{', '.join(HOSTED)} (kvslim-hosted classes)."
        )
    if init not in INITS:
        raise ConversionError(f"Unknown --mla-init '{init}'; valid: {', '.join(INITS)}.")
    if rope_strategy not in ROPE_STRATEGIES:
        raise ConversionError(f"Unknown --rope-strategy '{rope_strategy}'; valid: {', '.join(ROPE_STRATEGIES)}.")
    shape = choose_shape(kv_budget, kv_rank, rope_dim, layout)
    if adapter.rope(src.config) != adapter.rope_layout:
        raise ConversionError(
            f"MLA conversion needs RoPE on the whole head; this '{src.model_type}' rotates only part of it "
            f"({adapter.rope(src.config)}). Use --to gqa/mqa for this model."
        )
    theta = source_frequencies(src.config)
    query_bias = adapter.tensor_name(0, adapter.q_proj, "bias") in src.reader.keys()

    ids, record.calibration = calibration_windows(src, calib_data, calib_samples, calib_seq_len)
    runner = LayerwiseRunner(src, ids, device=device, adapter=adapter)

    # Pass 1 (source stream): choose one RoPE frequency progression for all layers, because
    # DeepseekV3 has a single rotary embedding.
    gains = torch.zeros(layout.head_dim // 2, dtype=torch.float64)
    source_layers = list(runner.layers)
    probe = copy.copy(runner)
    probe.hidden = list(runner.hidden)
    for i in tqdm(range(layout.num_layers), desc="MLA: choosing RoPE frequencies", unit="layer", disable=not progress):
        cov = probe.attention_input_moment(i, adapter.attention_module)
        gains += _frequency_gain(adapter.read(src.reader, i, layout), layout, theta, cov, rope_strategy, calib_seq_len,
                                 adapter.rope_layout)
        probe.advance(i, source_layers[i], {})
    del probe
    window = rope_progression(gains, shape.rope_dim // 2)

    config = deepseek_config(src.config, shape, window, query_bias)
    if out_dtype is not None:
        config.dtype = out_dtype
    target = meta_model(config)
    target_layers, rotary = list(target.model.layers), target.model.rotary_emb.to(device)
    record.mla = {"kv_rank": shape.kv_rank, "latent_anchor": 1, "rope_dim": shape.rope_dim,
                  "cache_elements_per_layer": shape.cache_elements, "init": init, "rope_strategy": rope_strategy,
                  "rope_frequencies": {"start": window[0], "stride": window[1]}, "context_for_beta": calib_seq_len,
                  "query_bias_via_q_lora": query_bias}
    record.kv_bytes_per_token_after = mla_kv_bytes(
        layout.num_layers, shape, out_dtype or src.reader.dtype(adapter.required(0)[0]))

    scaling = layout.head_dim ** -0.5
    with out as tmp:
        writer = writer_factory(tmp)
        copy_non_layer_tensors(src, adapter, layout, writer, out_dtype)
        errors = []
        for i in tqdm(range(layout.num_layers), desc=f"MLA ({init}, rank {shape.kv_rank}, rope {shape.rope_dim})",
                      unit="layer", disable=not progress):
            weights = adapter.read(src.reader, i, layout)
            cov = runner.attention_input_moment(i, adapter.attention_module)
            layer = convert_attention_mla(weights, layout, shape, theta, cov=cov, init=init, rope_strategy=rope_strategy,
                                          context=calib_seq_len, source_scaling=scaling, rope_layout=adapter.rope_layout,
                                          rope_window=window)
            attn_prefix = f"{adapter.prefix(i)}{adapter.attention_module}."
            converted = layer.tensors(attn_prefix)
            call = _target_call(runner, i, rotary)
            renamed, replaced = adapter.deepseek_layer_tensors(src.reader, i)
            if refine_steps:
                converted, err = _refine(runner, adapter, i, target_layers[i], converted, refine_steps, refine_lr,
                                         target_position_embeddings=call["position_embeddings"],
                                         frozen=ANCHORED, layer_tensors=renamed)
                errors.append(round(err, 6))
            runner.advance(i, target_layers[i], {k: v.float() for k, v in {**renamed, **converted}.items()}, call=call)
            skip = set(adapter.write(weights, i)) | replaced
            for name in src.layer_names(adapter.prefix(i)):
                if name not in skip and not name.startswith(attn_prefix):
                    writer.add(name, _cast(src.reader.get(name), out_dtype))
            for name, tensor in {**renamed, **converted}.items():
                writer.add(name, _cast(tensor, out_dtype))
        if errors:
            record.refinement = {"steps": refine_steps, "lr": refine_lr, "relative_output_error": errors}
        writer.close()
        save(tmp, config)


def _frequency_gain(weights, layout, theta, cov, strategy, context, rope_layout) -> torch.Tensor:
    """Per-frequency benefit of keeping a pair under RoPE (the criterion the layer conversion uses)."""
    from .gqa import head_views, pair_indices

    q, k, _, _ = head_views(weights, layout)
    *_, gain = shared_rope_key(q, k, cov, rotation_keep_factor(theta, context), strategy,
                               *pair_indices(layout.head_dim, rope_layout))
    return gain if strategy == "partial" else gain / gain.sum().clamp(min=1e-30)


def _target_call(runner, index: int, rotary) -> dict:
    """The source layer's arguments with DeepseekV3's own rotary embeddings."""
    call = dict(runner.layer_kwargs[index])
    hidden = runner.hidden[0]
    positions = call.get("position_ids")
    if positions is None:
        positions = torch.arange(hidden.shape[1], device=hidden.device)[None]
    with torch.no_grad():
        call["position_embeddings"] = rotary(hidden, positions)
    return call


def mla_kv_bytes(num_layers: int, shape: MLAShape, dtype: torch.dtype) -> int:
    return num_layers * shape.cache_elements * torch.tensor([], dtype=dtype).element_size()


def hosted_mla_class(adapter: AttentionAdapter, config) -> str | None:
    """The kvslim-hosted model class an MLA conversion of `config` writes, or None for DeepseekV3.

    Architectures whose blocks DeepseekV3 reproduces (MLA_SOURCES, RoPE on the whole head) become
    DeepseekV3; the others keep their own class with kvslim's latent attention (modeling/hosted/)."""
    from ..modeling.hosted import HOSTED

    if adapter.hosted:
        return adapter.hosted
    model_type = config.model_type
    deepseek = model_type in MLA_SOURCES and adapter.rope(config) == adapter.rope_layout
    return model_type if not deepseek and model_type in HOSTED else None


def layer_frequencies(call: dict, re: torch.Tensor) -> torch.Tensor:
    """The source's RoPE frequency of each pair in this layer, read off the cos/sin the model
    passes it (position 1): covers per-layer RoPE (Gemma 3 local/global) and any scaling rule."""
    cos, sin = call["position_embeddings"]
    cos, sin = cos.reshape(-1, *cos.shape[-2:])[0, 1].double(), sin.reshape(-1, *sin.shape[-2:])[0, 1].double()
    return torch.atan2(sin[re], cos[re]).cpu()  # weight math runs on the CPU


def convert_hosted_mla(src: CheckpointSource, adapter: AttentionAdapter, layout, out, writer_factory, record, *,
                       kv_rank, rope_dim, kv_budget, init, rope_strategy, calib_data, calib_samples, calib_seq_len,
                       refine_steps, refine_lr, out_dtype, device, progress, started, save):
    """MLA in a kvslim-hosted class: keys and values of all heads from one cached latent
    (modeling/hosted/kvslim_attention.py). Without RoPE (GPT-2, OPT, BERT) that is all; with RoPE
    (Qwen3, Gemma, GPT-NeoX) one shared RoPE key per layer joins it (`LatentRopeAttention`)."""
    if init not in INITS:
        raise ConversionError(f"Unknown --mla-init '{init}'; valid: {', '.join(INITS)}.")
    if adapter.rope(src.config) != "none":
        return _convert_hosted_rope_mla(
            src, adapter, layout, out, writer_factory, record, kv_rank=kv_rank, rope_dim=rope_dim, kv_budget=kv_budget,
            init=init, rope_strategy=rope_strategy, calib_data=calib_data, calib_samples=calib_samples,
            calib_seq_len=calib_seq_len, refine_steps=refine_steps, refine_lr=refine_lr, out_dtype=out_dtype,
            device=device, progress=progress, save=save)
    from ..modeling.hosted import hosted_config
    from .mla import convert_attention_latent
    from .pipeline import _cast, _refine, copy_non_layer_tensors

    if rope_dim is not None:
        raise ConversionError(f"--rope-dim does not apply: '{src.model_type}' has no rotary embeddings.")
    if check_budget_or_rank(kv_budget, kv_rank, "--kv-rank R"):
        kv_rank = min(int(kv_budget * 2 * layout.num_kv_heads * layout.head_dim + 1e-9),
                      max_latent_rank(layout, layout.hidden_size))
    check_rank(kv_rank, layout, layout.hidden_size)

    ids, record.calibration = calibration_windows(src, calib_data, calib_samples, calib_seq_len)
    runner = LayerwiseRunner(src, ids, device=device, adapter=adapter)
    config = hosted_config(adapter.hosted, src.config, layout.num_heads)
    config.kv_lora_rank = kv_rank
    if out_dtype is not None:
        config.dtype = out_dtype
    target_layers = list(meta_model(config, adapter.model_kind).get_submodule(adapter.layers_path))
    record.mla = {"kv_rank": kv_rank, "latent_anchor": 0, "rope_dim": 0, "cache_elements_per_layer": kv_rank,
                  "init": init, "rope_strategy": "none (no rotary embeddings)"}
    dtype = out_dtype or src.reader.dtype(adapter.required(0)[0])
    record.kv_bytes_per_token_after = layout.num_layers * kv_rank * torch.tensor([], dtype=dtype).element_size()

    with out as tmp:
        writer = writer_factory(tmp)
        copy_non_layer_tensors(src, adapter, layout, writer, out_dtype)
        errors = []
        for i in tqdm(range(layout.num_layers), desc=f"MLA ({init}, rank {kv_rank})", unit="layer", disable=not progress):
            weights = adapter.read(src.reader, i, layout)
            cov = runner.attention_input_moment(i, adapter.attention_module)
            latent = convert_attention_latent(weights, layout, kv_rank, cov=cov, init=init)
            converted = adapter.write_latent(weights, latent, i)
            if refine_steps:
                converted, err = _refine(runner, adapter, i, target_layers[i], converted, refine_steps, refine_lr)
                errors.append(round(err, 6))
            runner.advance(i, target_layers[i], {k: v.float() for k, v in converted.items()})
            source_attn = set(adapter.write(weights, i))
            for name in src.layer_names(adapter.prefix(i)):
                if name not in source_attn:
                    writer.add(name, _cast(src.reader.get(name), out_dtype))
            for name, tensor in converted.items():
                writer.add(name, _cast(tensor, out_dtype))
        if errors:
            record.refinement = {"steps": refine_steps, "lr": refine_lr, "relative_output_error": errors}
        writer.close()
        save(tmp, config)


def _convert_hosted_rope_mla(src, adapter, layout, out, writer_factory, record, *, kv_rank, rope_dim, kv_budget, init,
                             rope_strategy, calib_data, calib_samples, calib_seq_len, refine_steps, refine_lr, out_dtype,
                             device, progress, save):
    from ..modeling.hosted import hosted_config
    from .gqa import pair_indices
    from .mla import convert_attention_latent_rope
    from .pipeline import _cast, _refine, copy_non_layer_tensors

    if rope_strategy not in ROPE_STRATEGIES:
        raise ConversionError(f"Unknown --rope-strategy '{rope_strategy}'; valid: {', '.join(ROPE_STRATEGIES)}.")
    hosted = hosted_mla_class(adapter, src.config)
    rope_layout = adapter.rope(src.config)
    re, im = pair_indices(layout.head_dim, rope_layout)
    key_norm = adapter.qk_norm
    overhead = layout.num_kv_heads if key_norm else 0  # one key-norm gain per source KV head
    shape = choose_shape(kv_budget, kv_rank, rope_dim, layout, rotary_dims=2 * re.shape[0], reserved=overhead,
                         reserved_what="key-norm scales")
    kv_rank, rope_dim = shape.kv_rank, shape.rope_dim
    text = text_config(src.config)
    eps = getattr(text, "rms_norm_eps", 1e-6)

    ids, record.calibration = calibration_windows(src, calib_data, calib_samples, calib_seq_len)
    runner = LayerwiseRunner(src, ids, device=device, adapter=adapter)
    config = hosted_config(hosted, src.config, layout.num_kv_heads)
    config.kv_lora_rank, config.qk_rope_head_dim = kv_rank, rope_dim
    if out_dtype is not None:
        config.dtype = out_dtype
    target_layers = list(meta_model(config, adapter.model_kind).get_submodule(adapter.layers_path))
    elements = kv_rank + rope_dim + overhead
    record.mla = {"kv_rank": kv_rank, "latent_anchor": 0, "rope_dim": rope_dim, "key_norm_scales": overhead,
                  "cache_elements_per_layer": elements, "init": init, "rope_strategy": rope_strategy,
                  "context_for_beta": calib_seq_len, "model_class": type(target_layers[0]).__module__,
                  "qk_norm": ("exact at full rank: queries keep the source's q-norm; the latent factors the key before "
                              "its norm and the cache holds each token's key-norm gain (one per source KV head)")
                  if key_norm else "none"}
    dtype = out_dtype or src.reader.dtype(adapter.required(0)[0])
    record.kv_bytes_per_token_after = layout.num_layers * elements * torch.tensor([], dtype=dtype).element_size()
    windows = []

    with out as tmp:
        writer = writer_factory(tmp)
        copy_non_layer_tensors(src, adapter, layout, writer, out_dtype)
        errors = []
        for i in tqdm(range(layout.num_layers), desc=f"MLA ({init}, rank {kv_rank}, rope {rope_dim})", unit="layer",
                      disable=not progress):
            weights = adapter.read(src.reader, i, layout)
            o_bias = adapter.tensor_name(i, adapter.o_proj, "bias")
            if o_bias in src.reader.keys():
                weights.o_b = src.reader.get(o_bias)
            cov = runner.attention_input_moment(i, adapter.attention_module)
            theta = layer_frequencies(runner.layer_kwargs[i], re)
            tensors, window = convert_attention_latent_rope(
                weights, layout, kv_rank, rope_dim, theta, cov=cov, init=init, rope_strategy=rope_strategy,
                context=calib_seq_len, rope_layout=rope_layout, norm_eps=eps)
            windows.append(list(window))
            attn_prefix = f"{adapter.prefix(i)}{adapter.attention_module}."
            converted = {attn_prefix + name: t for name, t in tensors.items()}
            if refine_steps:
                converted, err = _refine(runner, adapter, i, target_layers[i], converted, refine_steps, refine_lr)
                errors.append(round(err, 6))
            runner.advance(i, target_layers[i], {k: _cast(v, torch.float32) for k, v in converted.items()})
            for name in src.layer_names(adapter.prefix(i)):
                if not name.startswith(attn_prefix):
                    writer.add(adapter.output_name(name), _cast(src.reader.get(name), out_dtype))
            for name, tensor in converted.items():
                writer.add(name, _cast(tensor, out_dtype))
        record.mla["rope_frequencies"] = [{"start": a, "stride": b} for a, b in windows]
        if errors:
            record.refinement = {"steps": refine_steps, "lr": refine_lr, "relative_output_error": errors}
        writer.close()
        save(tmp, config)
