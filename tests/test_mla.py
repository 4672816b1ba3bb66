"""MLA conversion: exactness at full rank, DeepseekV3 export, latent-only cache, budgets, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from test_gqa_math import IDS, convert_in_memory, disguise
from typer.testing import CliRunner

import kvslim
from kvslim.cli import app
from kvslim.convert import ConversionError, get_adapter
from kvslim.convert.mla import MLAShape, principal_directions, shape_for_budget

from common import load, logits, make_model

CALIB = dict(calib_samples=8, calib_seq_len=32, refine_steps=0, progress=False)


def rank1_keys_model(model_type: str, kv_heads: int, seed: int = 0):
    """A model with `kv_heads` genuinely different KV heads whose RoPE keys are rank-1 per frequency
    across heads (a disguised MQA model): the only kind of multi-head key DeepseekV3's single
    shared RoPE key can reproduce exactly."""
    mqa = make_model(model_type, 8, 1, seed=seed)
    return mqa, disguise(convert_in_memory(mqa, kv_heads, "mean"), seed=seed + 1)


@pytest.mark.parametrize("model_type,kv_heads", [("llama", 8), ("llama", 1), ("qwen2", 4), ("qwen2", 8)])
def test_full_rank_all_rope_dims_reproduces_source(model_type, kv_heads, save_model, tmp_path, text_file):
    mqa, model = rank1_keys_model(model_type, kv_heads)
    torch.testing.assert_close(logits(model, IDS), logits(mqa, IDS), rtol=0, atol=1e-4)
    src = save_model(model)
    record = kvslim.convert(str(src), tmp_path / "mla", to="mla", kv_rank=65, rope_dim=16,
                            calib_data=str(text_file), **CALIB)
    out = load(tmp_path / "mla")  # plain Transformers: a DeepseekV3 checkpoint, no kvslim import
    assert type(out).__name__ == "DeepseekV3ForCausalLM"
    assert out.config.q_lora_rank == (65 if model_type == "qwen2" else None)  # query bias via q_lora
    torch.testing.assert_close(logits(out, IDS), logits(model, IDS), rtol=0, atol=2e-4)
    assert record.mla["rope_frequencies"] == {"start": 0, "stride": 1}


def test_generate_and_cache_holds_only_latent_and_rope_key(save_model, tmp_path, text_file):
    from transformers import DynamicCache

    src = save_model(make_model("llama", 8, 8))
    record = kvslim.convert(str(src), tmp_path / "mla", to="mla", kv_budget=0.25, calib_data=str(text_file), **CALIB)
    out = load(tmp_path / "mla")
    shape = MLAShape(record.mla["kv_rank"], record.mla["rope_dim"])
    assert shape.cache_elements <= 0.25 * 2 * 8 * 16
    assert record.mla["allocation"]["kind"] == "uniform" and "one kv_lora_rank" in record.mla["allocation"]["rule"]
    cache = DynamicCache(config=out.config)
    with torch.no_grad():
        out(input_ids=IDS, past_key_values=cache, use_cache=True)
    per_token = 0
    for layer in cache.layers:
        latent, rope_key = layer.keys, layer.values
        assert latent.shape == (2, 1, IDS.shape[1], shape.kv_rank + 1)
        assert rope_key.shape == (2, 1, IDS.shape[1], shape.rope_dim)
        per_token += (latent[0, 0, 0].numel() + rope_key[0, 0, 0].numel()) * latent.element_size()
    assert per_token == record.kv_bytes_per_token_after
    info = kvslim.inspect(str(tmp_path / "mla"))
    assert info.attention == "MLA" and info.kv_bytes_per_token == record.kv_bytes_per_token_after
    generated = out.generate(IDS[:1, :5], max_new_tokens=6, do_sample=False)
    with torch.no_grad():  # greedy decoding with the cache equals recomputing from scratch
        ids = IDS[:1, :5]
        for _ in range(6):
            ids = torch.cat([ids, out(input_ids=ids).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, ids)


def test_budget_arithmetic():
    layout = get_adapter("llama").layout(make_model("llama", 8, 8).config)
    source = 2 * 8 * 16
    for budget in (0.5, 0.25, 0.125, 0.0625):
        shape = shape_for_budget(budget, layout, 64)
        assert shape.cache_elements <= budget * source
        assert shape.rope_dim % 2 == 0 and shape.rope_dim <= 16 and shape.kv_rank >= 1
    assert shape_for_budget(0.5, layout, 64, rope_dim=8) == MLAShape(min(128 - 9, 65), 8)
    with pytest.raises(ConversionError, match="needs at least"):
        shape_for_budget(0.01, layout, 64)


def test_default_init_beats_baselines_on_calibration(save_model, tmp_path, text_file):
    from kvslim.recipes.perplexity import load_causal_lm, tokenize_corpus

    model = make_model("llama", 8, 8, seed=4)
    src = save_model(model)
    _, tok = load_causal_lm(str(src))
    ids = torch.tensor(tokenize_corpus([text_file.read_text()], tok, 4 * 32)).view(4, 32)
    ref = logits(model, ids)
    err = {}
    for init in ("whitened", "svd"):
        kvslim.convert(str(src), tmp_path / init, to="mla", kv_budget=0.25, mla_init=init,
                       calib_data=str(text_file), **CALIB)
        err[init] = float((logits(load(tmp_path / init), ids) - ref).pow(2).mean())
    assert err["whitened"] < err["svd"], err


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("args,message", [
    (["--kv-rank", "999", "--rope-dim", "8"], "latent can have rank 1 to 65"),
    (["--kv-rank", "16", "--rope-dim", "7"], "must be even"),
    (["--kv-rank", "16", "--rope-dim", "32"], "at most the head dim 16"),
    (["--kv-budget", "0.01"], "needs at least"),
    (["--kv-budget", "0.25", "--kv-rank", "8"], "not both"),
    ([], "needs --kv-budget"),
    (["--kv-budget", "0.25", "--mla-init", "magic"], "valid: whitened, pca, svd"),
])
def test_bad_mla_arguments(args, message, save_model, tmp_path, text_file):
    src = save_model(make_model("llama", 8, 8))
    out = tmp_path / "out"
    r = run("convert", src, "-o", out, "--to", "mla", "--calib-data", text_file, "--calib-samples", "8",
            "--calib-seq-len", "32", *args)
    assert r.exit_code == 2 and message in r.output, r.output
    assert not out.exists() and not [p for p in tmp_path.iterdir() if "kvslim-" in p.name]


def test_unsupported_mla_source(save_model, tmp_path, text_file):
    src = save_model(make_model("starcoder2", 8, 4))  # not in the adapter registry
    r = run("convert", src, "-o", tmp_path / "out", "--to", "mla", "--kv-budget", "0.25", "--calib-data", text_file)
    assert r.exit_code == 2 and "Unsupported architecture 'starcoder2'" in r.output and "mixtral" in r.output
    assert not (tmp_path / "out").exists()


def test_cli_mla_end_to_end(save_model, tmp_path, text_file):
    src = save_model(make_model("llama", 8, 4))
    out = tmp_path / "out"
    r = run("convert", src, "-o", out, "--to", "mla", "--kv-budget", "0.5", "--calib-data", text_file,
            "--calib-samples", "8", "--calib-seq-len", "32", "--refine-steps", "5")
    assert r.exit_code == 0, r.output
    record = json.loads((out / "kvslim_conversion.json").read_text())
    assert record["target"] == "mla" and record["refinement"]["steps"] == 5
    assert "MLA" in run("inspect", out).output


@pytest.mark.parametrize("rows,cols,rank,deficient", [(96, 33, 20, False), (96, 33, 33, False), (24, 33, 10, False),
                                                     (96, 33, 20, True)])
def test_principal_directions_solve_the_smaller_problem_without_changing_the_subspace(rows, cols, rank, deficient):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(rows, cols, dtype=torch.float64, generator=g)
    if deficient:  # rank 15 < the asked 20: near-null directions, where the Gram route would divide by ~0
        w = w[:, :15] @ torch.randn(15, cols, dtype=torch.float64, generator=g)
    x = torch.randn(500, cols, dtype=torch.float64, generator=g)
    cov = x.T @ x / 500
    got = principal_directions(w, cov, rank)
    _, vecs = torch.linalg.eigh(w @ cov @ w.T)
    want = vecs[:, -rank:]
    assert got.shape == (rows, rank)
    assert torch.allclose(got.T @ got, torch.eye(rank, dtype=torch.float64), atol=1e-8)  # orthonormal
    top = min(rank, 15) if deficient else rank  # the directions with energy: the same subspace
    assert torch.allclose(got[:, :top] @ got[:, :top].T, want[:, -top:] @ want[:, -top:].T, atol=1e-8)


def test_principal_directions_with_a_singular_input_moment_stay_in_the_smaller_problem(monkeypatch):
    """Fewer calibration tokens than input dims (8 x 128 at hidden 4096): the moment is singular and the
    asked rank exceeds its rank. The directions with data are the exact problem's (to the ridge's 1e-4),
    the rest are zero, and the (rows x rows) problem is never formed."""
    g = torch.Generator().manual_seed(1)
    rows, cols, tokens, rank = 96, 33, 20, 25
    w = torch.randn(rows, cols, dtype=torch.float64, generator=g)
    x = torch.randn(tokens, cols, dtype=torch.float64, generator=g)
    cov = x.T @ x / tokens  # rank 20
    _, vecs = torch.linalg.eigh(w @ cov @ w.T)
    want = vecs[:, -tokens:]
    eigh = torch.linalg.eigh

    def small_only(m):
        assert m.shape[0] <= cols, "the rows x rows problem was formed"
        return eigh(m)

    monkeypatch.setattr(torch.linalg, "eigh", small_only)
    got = principal_directions(w, cov, rank)
    monkeypatch.undo()
    assert got.shape == (rows, rank)
    assert torch.allclose(got[:, :tokens].T @ got[:, :tokens], torch.eye(tokens, dtype=torch.float64), atol=1e-8)
    assert not got[:, tokens:].any()  # no data reaches these: their latent rows stay zero
    assert torch.allclose(got[:, :tokens] @ got[:, :tokens].T, want @ want.T, atol=1e-3)
    energy = torch.einsum("nr,nd,de,me,mr->", got, w, cov, w, got)
    assert torch.isclose(energy, torch.linalg.eigvalsh(w @ cov @ w.T)[-tokens:].sum(), rtol=1e-6)
