"""The same work on a CUDA device: conversion, absorbed MLA decoding, uptraining with bf16.

Skipped without a GPU (CI has none); run them where one is available:
`python -m pytest tests/test_gpu.py tests/test_attention.py -k "gpu or cuda"`.
"""

from __future__ import annotations

import json

import pytest
import torch
from test_gqa_math import IDS

import kvslim
import kvslim.modeling as km
from kvslim.recipes.uptrain import UptrainConfig, run

from common import load, logits, make_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CALIB = dict(calib_samples=8, calib_seq_len=32, progress=False)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def source_model(name: str):
    from common import gpt2

    return gpt2() if name == "gpt2" else make_model(name, 8, 8 if name == "llama" else 2)


@pytest.mark.parametrize("name,target", [("llama", dict(to="gqa", kv_heads=2, method="aware")),
                                         ("llama", dict(to="mla", kv_budget=0.25)),  # DeepseekV3
                                         ("qwen3", dict(to="mla", kv_budget=0.25)),  # hosted, RoPE + q/k-norm
                                         ("gpt2", dict(to="mla", kv_budget=0.25))],  # hosted, no RoPE
                         ids=["llama-gqa-aware", "llama-mla", "qwen3-mla", "gpt2-mla"])
def test_conversion_on_cuda_matches_cpu(name, target, save_model, tmp_path, text_file):
    src = save_model(source_model(name))
    out = {}
    for i, device in enumerate(("cpu", "cuda")):
        kvslim.convert(str(src), tmp_path / f"out{i}", calib_data=str(text_file), refine_steps=0, device=device,
                       **CALIB, **target)
        out[device] = logits(load(tmp_path / f"out{i}"), IDS)
    # the same closed form; only the order of floating-point sums differs between the devices
    assert relative_error(out["cuda"], out["cpu"]) < 1e-3
    # refinement (an optimiser loop per layer) runs on the device too and keeps the output finite
    kvslim.convert(str(src), tmp_path / "refined", calib_data=str(text_file), refine_steps=20, device="cuda",
                   **CALIB, **target)
    assert torch.isfinite(logits(load(tmp_path / "refined"), IDS)).all()


def test_absorbed_mla_on_cuda_matches_the_expanded_path(save_model, tmp_path, text_file):
    src = save_model(make_model("llama", 8, 8))
    kvslim.convert(str(src), tmp_path / "mla", to="mla", kv_budget=0.25, calib_data=str(text_file), refine_steps=0,
                   **CALIB)
    model = load(tmp_path / "mla").cuda()
    ids = IDS.cuda()
    want_logits = logits(model, ids)
    want = model.generate(ids[:1, :6], max_new_tokens=8, do_sample=False)
    km.enable(model)
    assert relative_error(logits(model, ids), want_logits) < 1e-4
    assert torch.equal(model.generate(ids[:1, :6], max_new_tokens=8, do_sample=False), want)
    km.disable(model)


def test_uptraining_on_cuda_with_bf16(save_model, tmp_path, text_file):
    teacher = save_model(make_model("llama", 8, 8, seed=1), "teacher")
    kvslim.convert(str(teacher), tmp_path / "student", to="mqa", method="mean", progress=False)
    cfg = UptrainConfig(model=str(tmp_path / "student"), teacher=str(teacher), data=[str(text_file)], seq_len=32,
                        micro_batch=4, eval_rows=4, tokens=str(128 * 8), lm=1.0, kd=1.0, mixed_precision="bf16",
                        eval_every=4, checkpoint_every=1000, log_every=1, progress=False, output=str(tmp_path / "out"))
    result = run(cfg)
    records = [json.loads(line) for line in (tmp_path / "out.log.jsonl").read_text().splitlines()]
    assert records and all(torch.isfinite(torch.tensor([r["lm"], r["kd"]])).all() for r in records if "lm" in r)
    assert all(e["eval_ppl"] > 1 for e in result["evaluations"])
    assert torch.isfinite(logits(load(tmp_path / "out"), IDS)).all()  # the saved checkpoint loads on the CPU
