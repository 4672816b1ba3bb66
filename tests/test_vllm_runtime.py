"""`--to mla --runtime vllm`: a DeepseekV3 checkpoint inside stock vLLM's constraints.

vLLM's DeepSeek attention has no bias terms (it silently skips bias tensors), its MLA kernels
take a 512 + 64 (or 256 + 64) latent + RoPE key, and it rewrites any rope_type but "default".
These tests check the checkpoint against those rules and in Transformers; the check in vLLM
itself is benchmarks/vllm_serving.py (and the opt-in test at the end, with KVSLIM_VLLM_PYTHON).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import kvslim
from kvslim.convert import ConversionError

from common import IDS, greedy_without_cache, load, make_model

FAST = dict(calib_samples=8, calib_seq_len=32, refine_steps=0, progress=False)


def _source(save_model, model_type="llama", heads=4, head_dim=128, hidden=128, **extra):
    model = make_model(model_type, heads, heads, head_dim=head_dim, hidden_size=hidden, **extra)
    return model, save_model(model, f"{model_type}-{heads}x{head_dim}")


def _tensor_names(path: Path) -> list[str]:
    names = []
    for f in path.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            names += list(h.keys())
    return names


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])  # qwen2: Q/K/V biases, folded away
def test_vllm_checkpoint_has_vllm_shapes_no_biases_and_decodes_consistently(model_type, save_model, tmp_path,
                                                                            text_file):
    model, src = _source(save_model, model_type, hidden=512, num_hidden_layers=1)  # K/V: 2 x 4 x 128 = 1,024
    record = kvslim.convert(str(src), tmp_path / "vllm", to="mla", runtime="vllm", calib_data=str(text_file), **FAST)
    config = json.loads((tmp_path / "vllm" / "config.json").read_text())
    assert config["architectures"] == ["DeepseekV3ForCausalLM"]
    assert (config["kv_lora_rank"], config["qk_rope_head_dim"], config["qk_nope_head_dim"]) == (512, 64, 128)
    assert config["attention_bias"] is False and config["q_lora_rank"] is None
    assert config["rope_parameters"]["rope_type"] == "default"
    assert not [n for n in _tensor_names(tmp_path / "vllm") if n.endswith(".bias")]  # nothing vLLM would drop
    assert record.mla["runtime"] == "vllm" and record.mla["cache_elements_per_layer"] == 576
    assert "latent_padding" not in record.mla  # hidden 512: the latent has rank 511 of its own
    assert record.kv_bytes_per_token_after * 1024 == record.kv_bytes_per_token_before * 576
    assert "for vLLM" in record.summary()
    converted = load(tmp_path / "vllm")
    assert torch.equal(converted.generate(IDS[:1], max_new_tokens=5, do_sample=False), greedy_without_cache(converted, 5))
    assert len(record.mla["constant_fit_error"]) == 1  # how well u.x stood in for the biases, per layer
    if model_type == "qwen2":  # biases folded through u.x: how much that costs depends on the model
        return
    # the bias-free form stays close to the default runtime's at the same cache size
    default = kvslim.convert(str(src), tmp_path / "default", to="mla", kv_budget=576 / 1024,
                             calib_data=str(text_file), **FAST)
    assert default.mla["cache_elements_per_layer"] == 576
    ref = model(input_ids=IDS).logits.detach()
    err = {name: float((load(tmp_path / name)(input_ids=IDS).logits.detach() - ref).norm() / ref.norm())
           for name in ("vllm", "default")}
    assert err["vllm"] < 1.5 * err["default"], err  # random MHA heads: both lose much to the shared RoPE key


def test_a_budget_vllm_cannot_express_is_refused_with_the_nearest_shape(save_model, tmp_path, text_file):
    _, src = _source(save_model, hidden=256)
    for options, message in [(dict(kv_budget=0.5), "Nearest: --kv-budget 0.5625 (512 + 64)"),
                             (dict(kv_rank=300), "--kv-rank 300 is not a latent vLLM's kernels take"),
                             (dict(kv_rank=512, rope_dim=32), "--rope-dim 32")]:
        with pytest.raises(ConversionError, match=message.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
            kvslim.convert(str(src), tmp_path / "out", to="mla", runtime="vllm", calib_data=str(text_file), **options,
                           **FAST)
        assert not (tmp_path / "out").exists()
    record = kvslim.convert(str(src), tmp_path / "small", to="mla", runtime="vllm", kv_budget=320 / 1024,
                            calib_data=str(text_file), **FAST)
    assert (record.mla["kv_rank"] + record.mla["latent_anchor"], record.mla["rope_dim"]) == (256, 64)


def test_a_source_smaller_than_the_kernel_shape_is_padded_and_says_it_costs_memory(save_model, tmp_path, text_file):
    _, src = _source(save_model, heads=2, head_dim=64, hidden=128)  # K/V: 2 x 2 x 64 = 256 per layer
    record = kvslim.convert(str(src), tmp_path / "pad", to="mla", runtime="vllm", calib_data=str(text_file), **FAST)
    assert record.mla["latent_padding"] == 511 - record.mla["kv_rank"] > 0
    assert record.kv_bytes_per_token_after > record.kv_bytes_per_token_before
    assert any("costs more memory" in note for note in record.notes)
    config = json.loads((tmp_path / "pad" / "config.json").read_text())
    assert config["kv_lora_rank"] == 512
    padded = load(tmp_path / "pad")
    assert torch.equal(padded.generate(IDS[:1], max_new_tokens=4, do_sample=False), greedy_without_cache(padded, 4))


def test_sources_vllm_cannot_serve_are_refused(save_model, tmp_path, text_file):
    _, small_heads = _source(save_model, heads=4, head_dim=32, hidden=128)
    with pytest.raises(ConversionError, match="head dim of at least 64"):
        kvslim.convert(str(small_heads), tmp_path / "a", to="mla", runtime="vllm", calib_data=str(text_file), **FAST)
    qwen3 = save_model(make_model("qwen3", 4, 1, head_dim=64), "qwen3")
    with pytest.raises(ConversionError, match="hosted class 'qwen3'.*Use --runtime transformers"):
        kvslim.convert(str(qwen3), tmp_path / "b", to="mla", runtime="vllm", calib_data=str(text_file), **FAST)
    with pytest.raises(ConversionError, match="Unknown --runtime 'sglang'"):
        kvslim.convert(str(qwen3), tmp_path / "c", to="mla", runtime="sglang", calib_data=str(text_file), **FAST)
    with pytest.raises(ConversionError, match="--runtime does not apply to --to gqa"):
        kvslim.convert(str(qwen3), tmp_path / "d", to="gqa", kv_heads=1, runtime="vllm", **FAST)


@pytest.mark.skipif(not os.environ.get("KVSLIM_VLLM_PYTHON"),
                    reason="opt-in: set KVSLIM_VLLM_PYTHON to a python with stock vLLM (bash .ci/setup_vllm)")
def test_stock_vllm_serves_the_checkpoint_as_transformers_runs_it(tmp_path):
    proc = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "benchmarks" / "vllm_serving.py"),
                           "--vllm-python", os.environ["KVSLIM_VLLM_PYTHON"], "--refine-steps", "0",
                           "--out", "vllm_serving_test"], capture_output=True, text=True, timeout=3000)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
