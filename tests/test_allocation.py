"""Per-layer cache allocation: the knapsack over layers, the per-layer error estimate it ranks
shapes by, and the hosted MLA conversions that use it by default."""

from __future__ import annotations

import itertools

import pytest
import torch

import kvslim
from kvslim.convert.allocation import LayerChoices, allocate
from kvslim.convert.gqa import pair_indices
from kvslim.convert.mla import latent_rope_errors

from common import CALIB, IDS, greedy_without_cache, load, make_model, outputs


def random_layers(seed: int, n_layers: int = 3, falling: bool = True) -> list[LayerChoices]:
    """Choices of cost 2..8, two per cost; `falling`: errors fall as the cost grows (as a latent's rank)."""
    g = torch.Generator().manual_seed(seed)
    layers = []
    for _ in range(n_layers):
        layer = LayerChoices()
        level = 10.0
        for cost in range(2, 9):
            for variant in range(2):
                error = float(torch.rand(1, generator=g)) * (level if falling else 10.0)
                layer.offer(cost, error, (cost, variant))
            level = min(e for e, _ in [layer.best[cost]])
        layers.append(layer)
    return layers


def brute_force(layers, total):
    return min(sum(layer.best[c][0] for layer, c in zip(layers, costs))
               for costs in itertools.product(range(2, 9), repeat=len(layers)) if sum(costs) <= total)


@pytest.mark.parametrize("seed", range(4))
def test_allocation_spends_the_whole_budget_at_the_least_summed_error(seed):
    for falling in (True, False):
        layers = random_layers(seed, falling=falling)
        for total in (6, 11, 17, 24):
            picked = allocate(layers, total)
            got = sum(layer.best[cost][0] for layer, (cost, _) in zip(layers, picked))
            assert got == pytest.approx(brute_force(layers, total))
            spent = sum(cost for cost, _ in picked)
            assert spent == total if falling else spent <= total


def test_allocation_beyond_every_layers_largest_shape_and_below_the_smallest():
    layers = random_layers(0, falling=False)
    picked = allocate(layers, 100)  # more than all layers can use: each takes its best shape
    for layer, (cost, _) in zip(layers, picked):
        assert layer.best[cost][0] == min(e for e, _ in layer.best.values())
    with pytest.raises(kvslim.ConversionError, match="below the 6"):
        allocate(layers, 5)


def mqa_layer(nh=4, hd=16, d=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(nh, hd, d + 1, dtype=torch.float64, generator=g)
    k = torch.randn(1, hd, d + 1, dtype=torch.float64, generator=g).expand(nh, -1, -1).clone()
    v = torch.randn(1, hd, d + 1, dtype=torch.float64, generator=g).expand(nh, -1, -1).clone()
    o = torch.randn(nh, d, hd, dtype=torch.float64, generator=g)
    x = torch.randn(400, d, dtype=torch.float64, generator=g)
    x = torch.cat([x, torch.ones(400, 1, dtype=torch.float64)], dim=1)
    return q, k, v, o, x.T @ x / 400


def test_error_estimate_is_zero_at_full_rank_and_falls_with_rank_and_kept_pairs():
    q, k, v, o, cov = mqa_layer()
    hd = 16
    re, im = pair_indices(hd, "half")
    theta = 1.0 / 10000 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    errors = latent_rope_errors(q, k, v, o, cov, theta, [2, 4, 8], rope_strategy="rotate", context=256, re=re, im=im)
    full = errors[8]  # every pair kept: one KV head's key is exactly the shared RoPE key
    assert float(full[0]) == pytest.approx(1.0, rel=1e-6)  # nothing cached: all of the output energy is lost
    assert float(full[hd]) < 1e-9  # the latent holds the values (rank hd) exactly
    for err in errors.values():
        assert torch.all(err[1:] <= err[:-1] + 1e-12)
    # fewer rotating pairs cost rotation that no latent rank brings back
    assert float(errors[2][-1]) > float(errors[4][-1]) > float(errors[8][-1])


def test_per_layer_allocation_reaches_full_rank_exactly_when_the_budget_allows(save_model, tmp_path, text_file):
    # one KV head (its key is exactly one shared RoPE key) and hidden 8: full rank (RoPE 16 + latent 9
    # + 1 key-norm gain) fits the source's 2 x 16 cache elements per layer
    model = make_model("qwen3", 4, 1, hidden_size=8)
    src = save_model(model, "qwen3")
    record = kvslim.convert(str(src), tmp_path / "full", to="mla", kv_budget=1.0, calib_data=str(text_file), **CALIB)
    layers = model.config.num_hidden_layers
    assert record.mla["allocation"]["kind"] == "per-layer"
    assert record.mla["rope_dim"] == [16] * layers and all(r >= 8 for r in record.mla["kv_rank"])
    assert sum(record.mla["cache_elements_per_layer"]) <= layers * 26  # what full rank needs, not the whole budget
    out = load(tmp_path / "full")
    torch.testing.assert_close(outputs(out), outputs(model), rtol=0, atol=2e-4)


def test_per_layer_shapes_differ_and_cached_decode_matches_uncached(save_model, tmp_path, text_file):
    model = make_model("gemma3_text", 4, 1, num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2)
    src = save_model(model, "gemma3_text")
    record = kvslim.convert(str(src), tmp_path / "q", to="mla", kv_budget=0.5, calib_data=str(text_file), **CALIB)
    source = 2 * 1 * model.config.head_dim
    assert sum(record.mla["cache_elements_per_layer"]) == 4 * int(0.5 * source)
    assert record.kv_bytes_per_token_after * 2 == record.kv_bytes_per_token_before
    shapes = list(zip(record.mla["kv_rank"], record.mla["rope_dim"]))
    assert len(set(shapes)) > 1, shapes
    out = load(tmp_path / "q")
    assert out.config.kv_lora_rank == record.mla["kv_rank"]
    assert kvslim.describe(out.config).kv_bytes_per_token == record.kv_bytes_per_token_after
    assert torch.equal(out.generate(IDS[:1], max_new_tokens=6, do_sample=False), greedy_without_cache(out, 6))
    uniform = kvslim.convert(str(src), tmp_path / "u", to="mla", kv_budget=0.5, allocation="uniform",
                             calib_data=str(text_file), **CALIB)
    assert uniform.mla["allocation"] == {"kind": "uniform", "rule": "--allocation uniform"}
    assert isinstance(uniform.mla["kv_rank"], int)
