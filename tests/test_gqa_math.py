"""Exactness of the head-merging math, on in-memory tiny models."""

from __future__ import annotations

import copy

import pytest
import torch

from kvslim.convert import ConversionError, convert_attention, get_adapter
from kvslim.convert.gqa import AttentionWeights, pair_indices, pairwise_merge_cost, plan_groups

from common import logits, make_model


def read_weights(model, i: int) -> AttentionWeights:
    a = model.model.layers[i].self_attn
    q_norm = getattr(a, "q_norm", None)
    return AttentionWeights(a.q_proj.weight.detach(), a.k_proj.weight.detach(), a.v_proj.weight.detach(),
                            a.o_proj.weight.detach(), a.q_proj.bias, a.k_proj.bias, a.v_proj.bias,
                            None if q_norm is None else q_norm.weight.detach())


def convert_in_memory(model, kv_heads, method="aware", groups=None, covs=None):
    """Apply convert_attention to every layer and return a model of the target shape."""
    from transformers import AutoModelForCausalLM

    adapter = get_adapter(model.config.model_type)
    layout = adapter.layout(model.config)
    config = copy.deepcopy(model.config)
    config.num_key_value_heads = kv_heads
    out = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    state = dict(model.state_dict())
    for i in range(layout.num_layers):
        new = convert_attention(read_weights(model, i), layout, kv_heads, method,
                                groups=None if groups is None else groups[i],
                                cov=None if covs is None else covs[i], rope_layout=adapter.rope_layout)
        p = f"model.layers.{i}.self_attn."
        for name, t in (("q_proj.weight", new.q_w), ("k_proj.weight", new.k_w), ("v_proj.weight", new.v_w),
                        ("o_proj.weight", new.o_w), ("q_proj.bias", new.q_b), ("k_proj.bias", new.k_b),
                        ("v_proj.bias", new.v_b)):
            if t is not None:
                state[p + name] = t
    out.load_state_dict(state)
    return out


IDS = torch.randint(3, 320, (2, 12), generator=torch.Generator().manual_seed(0))
ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text"]


@pytest.mark.parametrize("model_type", ARCHS)
@pytest.mark.parametrize("method", ["mean", "aware"])
def test_same_kv_heads_is_identity(model_type, method):
    model = make_model(model_type, 8, 4)
    out = convert_in_memory(model, 4, method)
    assert torch.equal(logits(out, IDS), logits(model, IDS))


@pytest.mark.parametrize("model_type", ARCHS)
def test_gqa_to_mha_is_exact_and_back_with_mean(model_type):
    model = make_model(model_type, 8, 2)
    mha = convert_in_memory(model, 8, "mean")
    assert mha.config.num_key_value_heads == 8
    torch.testing.assert_close(logits(mha, IDS), logits(model, IDS), rtol=0, atol=1e-5)
    back = convert_in_memory(mha, 2, "mean")
    torch.testing.assert_close(logits(back, IDS), logits(model, IDS), rtol=0, atol=1e-5)


def disguise(model, seed: int = 1):
    """Give every KV head a different but foldable transform (exact, logits unchanged): K by a
    complex scalar per RoPE frequency (inverse folded into its query heads), V by an invertible map
    (inverse folded into its query heads' o_proj columns). Mean-pooling cannot undo this; the aware
    merge must."""
    g = torch.Generator().manual_seed(seed)
    layout = get_adapter(model.config.model_type).layout(model.config)
    hd, nh, kv = layout.head_dim, layout.num_heads, layout.num_kv_heads
    re, im = pair_indices(hd, "half")

    def scale_rows(proj, rows, factor):
        for t in [proj.weight] + ([proj.bias] if proj.bias is not None else []):
            blk = t[rows]
            z = torch.complex(blk[re], blk[im])
            z = z * (factor[:, None] if z.dim() == 2 else factor)
            blk[re], blk[im] = z.real, z.imag
            t[rows] = blk

    with torch.no_grad():
        for layer in model.model.layers:
            a = layer.self_attn
            for h in range(kv):
                rows = slice(h * hd, (h + 1) * hd)
                queries = [slice(i * hd, (i + 1) * hd) for i in range(h * nh // kv, (h + 1) * nh // kv)]
                c = torch.polar(0.5 + torch.rand(hd // 2, generator=g), 6.28 * torch.rand(hd // 2, generator=g))
                scale_rows(a.k_proj, rows, c)
                for q_rows in queries:
                    scale_rows(a.q_proj, q_rows, (1 / c).conj())
                m = torch.eye(hd) + 0.3 * torch.randn(hd, hd, generator=g)
                a.v_proj.weight[rows] = m.T @ a.v_proj.weight[rows]
                if a.v_proj.bias is not None:
                    a.v_proj.bias[rows] = m.T @ a.v_proj.bias[rows]
                for q_rows in queries:
                    a.o_proj.weight[:, q_rows] = a.o_proj.weight[:, q_rows] @ torch.linalg.inv(m).T
    return model


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_aware_undoes_foldable_head_transforms_and_mean_does_not(model_type):
    gqa = make_model(model_type, 8, 2)
    disguised = disguise(convert_in_memory(gqa, 8, "mean"))
    torch.testing.assert_close(logits(disguised, IDS), logits(gqa, IDS), rtol=0, atol=1e-4)
    aware = convert_in_memory(disguised, 2, "aware")
    torch.testing.assert_close(logits(aware, IDS), logits(gqa, IDS), rtol=0, atol=2e-4)
    mean = convert_in_memory(disguised, 2, "mean")
    assert (logits(mean, IDS) - logits(gqa, IDS)).abs().max() > 1e-2


def test_regrouping_permutation_is_exact():
    model = make_model("qwen2", 8, 8)
    perm = [[3], [0], [5], [1], [7], [2], [6], [4]]
    out = convert_in_memory(model, 8, "aware", groups=[perm, perm])
    torch.testing.assert_close(logits(out, IDS), logits(model, IDS), rtol=0, atol=1e-5)


def test_plan_groups_finds_planted_pairs_and_merge_is_then_exact():
    gqa = make_model("llama", 8, 4)
    mha = convert_in_memory(gqa, 8, "mean")
    # Scramble which query heads sit next to each other: exact when q rows and o columns move together.
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    scrambled = convert_in_memory(mha, 8, "mean", groups=[[[h] for h in order]] * 2)
    layout = get_adapter("llama").layout(scrambled.config)
    for i in range(2):
        cost = pairwise_merge_cost(read_weights(scrambled, i), layout, None)
        groups = plan_groups(cost, 4)
        assert groups == [[0, 4], [1, 5], [2, 6], [3, 7]]
    planned = [plan_groups(pairwise_merge_cost(read_weights(scrambled, i), layout, None), 4) for i in range(2)]
    merged = convert_in_memory(scrambled, 4, "aware", groups=planned)
    torch.testing.assert_close(logits(merged, IDS), logits(gqa, IDS), rtol=0, atol=1e-4)
    neighbours = convert_in_memory(scrambled, 4, "aware")
    assert (logits(neighbours, IDS) - logits(gqa, IDS)).abs().max() > 1e-3


def _output_error(model, converted, ids) -> float:
    ref = logits(model, ids)
    return float((logits(converted, ids) - ref).pow(2).mean() / ref.var())


def test_aware_beats_mean_on_calibration_covariance():
    model = make_model("llama", 8, 8, seed=3)
    ids = torch.randint(3, 320, (4, 32), generator=torch.Generator().manual_seed(1))
    # second moment of each layer's attention input on these tokens (augmented with a constant 1)
    covs = []
    hooks = []
    for layer in model.model.layers:
        def hook(mod, args, kwargs):
            x = kwargs["hidden_states"].reshape(-1, 64).double()
            x = torch.cat([x, torch.ones_like(x[:, :1])], 1)
            covs.append(x.T @ x / x.shape[0])
        hooks.append(layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True))
    logits(model, ids)
    for h in hooks:
        h.remove()
    for kv in (2, 1):
        aware = _output_error(model, convert_in_memory(model, kv, "aware", covs=covs), ids)
        mean = _output_error(model, convert_in_memory(model, kv, "mean"), ids)
        assert aware < 0.5 * mean, (kv, aware, mean)


def test_invalid_kv_heads_lists_valid_values():
    layout = get_adapter("llama").layout(make_model("llama", 8, 8).config)
    with pytest.raises(ConversionError, match=r"valid values: 1, 2, 4, 8"):
        convert_attention(read_weights(make_model("llama", 8, 8), 0), layout, 3)
