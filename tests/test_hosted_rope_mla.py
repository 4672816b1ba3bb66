"""MLA for RoPE architectures DeepseekV3 cannot express (Qwen3 and Gemma 3 q/k norms, Gemma/Gemma 2
blocks, GPT-NeoX partial rotary, softmax-routed MoE): kvslim's hosted classes with `LatentRopeAttention`."""

from __future__ import annotations

import pytest
import torch

import kvslim
from kvslim.convert.records import span

from common import (
    CALIB,
    IDS,
    fresh_interpreter_outputs,
    greedy_without_cache,
    load,
    make_model,
    neox,
    neox_shared_rotary_keys,
    outputs,
)


def source(arch):
    if arch == "gpt_neox":
        return neox_shared_rotary_keys(), 8
    extra = {"attn_logit_softcapping": 5.0, "sliding_window": 8} if arch == "gemma2" else {}
    return make_model(arch, 8, 1, **extra), 16  # one KV head: exact with one shared RoPE key


@pytest.mark.parametrize("arch", ["qwen3", "gemma", "gemma2", "gemma3_text", "gpt_neox", "mixtral", "qwen2_moe",
                                  "qwen3_moe"])
def test_full_rank_all_rotary_pairs_is_exact(arch, save_model, tmp_path, text_file):
    model, rotary = source(arch)
    src = save_model(model, arch)
    record = kvslim.convert(str(src), tmp_path / "full", to="mla", kv_rank=65, rope_dim=rotary,
                            calib_data=str(text_file), **CALIB)
    full = load(tmp_path / "full")
    assert full.config.model_type == f"kvslim_{arch}" and type(full).__name__.startswith("Kvslim")
    torch.testing.assert_close(outputs(full), outputs(model), rtol=0, atol=2e-4)
    torch.testing.assert_close(fresh_interpreter_outputs(tmp_path / "full", "causal", tmp_path), outputs(full),
                               rtol=0, atol=1e-5)
    key_norm = arch in ("qwen3", "gemma3_text", "qwen3_moe")
    assert record.mla["key_norm_scales"] == (1 if key_norm else 0)
    assert ("exact" in record.mla["qk_norm"]) == key_norm
    assert kvslim.describe(full.config).kv_bytes_per_token == record.kv_bytes_per_token_after


@pytest.mark.parametrize("arch", ["qwen3", "gemma3_text", "gpt_neox", "qwen3_moe"])
def test_budget_cache_holds_latent_rope_key_and_scales_and_decode_is_absorbed(arch, save_model, tmp_path, text_file):
    from transformers import DynamicCache

    model = neox() if arch == "gpt_neox" else make_model(arch, 8, 2)
    src = save_model(model, arch)
    record = kvslim.convert(str(src), tmp_path / "q", to="mla", kv_budget=0.25, calib_data=str(text_file),
                            calib_samples=8, calib_seq_len=32, refine_steps=5, progress=False)
    kv_heads = 4 if arch == "gpt_neox" else 2
    # the budget is spread over the layers (and between RoPE key and latent): exactly all of it
    layers = model.config.num_hidden_layers
    assert record.mla["allocation"]["kind"] == "per-layer" and len(record.mla["kv_rank"]) == layers
    assert sum(record.mla["cache_elements_per_layer"]) == layers * int(0.25 * 2 * kv_heads * 16)
    assert record.kv_bytes_per_token_after * 4 == record.kv_bytes_per_token_before
    out = load(tmp_path / "q")
    assert kvslim.describe(out.config).kv_bytes_per_token == record.kv_bytes_per_token_after
    cache = DynamicCache(config=out.config)
    with torch.no_grad():
        out(input_ids=IDS, past_key_values=cache, use_cache=True)
    per_token = sum(layer.keys[0, 0, 0].numel() * layer.keys.element_size() for layer in cache.layers)
    assert all(layer.values.numel() == 0 for layer in cache.layers)  # nothing but the latent entry
    assert per_token == record.kv_bytes_per_token_after
    # absorbed single-token decode over the cache == full forwards without a cache
    want = greedy_without_cache(out, 6)
    assert torch.equal(out.generate(IDS[:1], max_new_tokens=6, do_sample=False), want)
    assert torch.equal(out.generate(IDS[:1], max_new_tokens=6, do_sample=False, cache_implementation="static"), want)
    if arch == "qwen3":  # the model card states the cache layout and how q/k norms were handled
        from kvslim.recipes.publish import render_card

        text = render_card(tmp_path / "q", "me/qwen3-mla").content
        assert f"latent rank {span(record.mla['kv_rank'])}" in text and "2 key-norm gains" in text
        assert "allocated over layers" in text and ", ".join(map(str, record.mla["kv_rank"])) in text
        assert "exact at full rank" in text and "pairs per layer, from index 0" in text


def test_rope_dim_checked_against_rotary_dims(save_model, tmp_path):
    src = save_model(neox(rotary_pct=0.25), "neox")  # 4 rotary dims per head
    with pytest.raises(kvslim.ConversionError, match="4 rotary dims"):
        kvslim.convert(str(src), tmp_path / "o", to="mla", kv_rank=16, rope_dim=8, progress=False)
    src = save_model(make_model("qwen3", 8, 2), "qwen3")
    with pytest.raises(kvslim.ConversionError, match="key-norm scales"):
        kvslim.convert(str(src), tmp_path / "o", to="mla", kv_budget=0.02, progress=False)
    assert not (tmp_path / "o").exists()
