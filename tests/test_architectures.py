"""Architectures beyond Llama: GPT-2 and BERT (kvslim-hosted classes), Phi-3 (fused qkv, plain class).

Per architecture: identity and replication are exact; merging heads that only differ by maps the
aware merge can fold is exact (mean cannot); outputs reload with kvslim imported and with only
`trust_remote_code=True` in a fresh interpreter (kvslim blocked); generate works with the cache.
"""

from __future__ import annotations

import json

import pytest
import torch

import kvslim

from common import (
    CALIB,
    IDS,
    bert,
    fresh_interpreter_outputs,
    gpt2,
    greedy_without_cache,
    load,
    make_model,
    neox,
    opt,
    outputs,
    phi3,
)


def _heads(w: torch.Tensor, heads: int) -> torch.Tensor:
    return w.view(heads, -1, *w.shape[1:])


def make_groups_foldable(attn_qkvo, heads: int, group: int, seed: int = 0) -> None:
    """Within each group of `group` heads, give every head the group's first key/value up to an
    invertible per-head map, compensated in its query / output weights, so the model's function
    stays that of a valid MHA while K/V differ per head (what an aware merge can undo exactly).
    `attn_qkvo` returns Linear-layout views (q_w, q_b, k_w, k_b, v_w, v_b, o_w) to edit in place."""
    g = torch.Generator().manual_seed(seed)
    q_w, q_b, k_w, k_b, v_w, v_b, o_w = attn_qkvo()
    hd = q_w.shape[0] // heads
    with torch.no_grad():
        for h in range(heads):
            lead = h - h % group
            if h == lead:
                continue
            a = torch.eye(hd) + 0.3 * torch.randn(hd, hd, generator=g)  # k_h = a k_lead, q_h <- a^-T q_h
            c = torch.eye(hd) + 0.3 * torch.randn(hd, hd, generator=g)  # v_h = c v_lead, o_h <- o_h c^-1
            rows, lead_rows = slice(h * hd, (h + 1) * hd), slice(lead * hd, (lead + 1) * hd)
            k_w[rows] = a @ k_w[lead_rows]
            k_b[rows] = a @ k_b[lead_rows]
            q_w[rows] = torch.linalg.inv(a).T @ q_w[rows]
            q_b[rows] = torch.linalg.inv(a).T @ q_b[rows]
            v_w[rows] = c @ v_w[lead_rows]
            v_b[rows] = c @ v_b[lead_rows]
            o_w[:, rows] = o_w[:, rows] @ torch.linalg.inv(c)


def gpt2_views(model, layer):
    attn = model.transformer.h[layer].attn
    w, b = attn.c_attn.weight.data.T, attn.c_attn.bias.data  # views into the Conv1D storage
    e = w.shape[1]
    return (w[:e], b[:e], w[e:2 * e], b[e:2 * e], w[2 * e:], b[2 * e:], attn.c_proj.weight.data.T)


def bert_views(model, layer):
    s = model.encoder.layer[layer].attention.self
    o = model.encoder.layer[layer].attention.output.dense
    return (s.query.weight.data, s.query.bias.data, s.key.weight.data, s.key.bias.data, s.value.weight.data,
            s.value.bias.data, o.weight.data)


# ---- GPT-2 --------------------------------------------------------------------------------------


def test_gpt2_identity_and_foldable_merge_are_exact_and_reload_both_ways(save_model, tmp_path, text_file):
    model = gpt2()
    src = save_model(model, "gpt2")
    kvslim.convert(str(src), tmp_path / "same", to="mha", progress=False)
    same = load(tmp_path / "same")
    assert type(same).__name__ == "KvslimGPT2LMHeadModel"
    torch.testing.assert_close(outputs(same), outputs(model), rtol=0, atol=1e-5)

    for layer in range(2):
        make_groups_foldable(lambda: gpt2_views(model, layer), heads=4, group=2, seed=layer)
    src = save_model(model, "gpt2-foldable")
    kvslim.convert(str(src), tmp_path / "aware", to="gqa", kv_heads=2, calib_data=str(text_file), regroup=False, **CALIB)
    kvslim.convert(str(src), tmp_path / "mean", to="gqa", kv_heads=2, method="mean", progress=False)
    aware, mean = load(tmp_path / "aware"), load(tmp_path / "mean")
    assert aware.config.num_key_value_heads == 2
    assert aware.transformer.h[0].attn.c_attn.weight.shape == (64, 64 + 2 * 2 * 16)
    torch.testing.assert_close(outputs(aware), outputs(model), rtol=1e-4, atol=1e-4)
    assert (outputs(mean) - outputs(model)).abs().max() > 1e-2  # mean-pooling cannot undo the maps

    config = json.loads((tmp_path / "aware" / "config.json").read_text())
    assert config["model_type"] == "kvslim_gpt2" and "AutoModelForCausalLM" in config["auto_map"]
    assert (tmp_path / "aware" / "modeling_kvslim_gpt2.py").is_file()
    torch.testing.assert_close(fresh_interpreter_outputs(tmp_path / "aware", "causal", tmp_path), outputs(aware),
                               rtol=0, atol=1e-5)


def test_gpt2_mqa_generate_sdpa_and_padding(save_model, tmp_path):
    src = save_model(gpt2(), "gpt2")
    kvslim.convert(str(src), tmp_path / "mqa", to="mqa", method="mean", progress=False)
    eager = load(tmp_path / "mqa")
    from transformers import AutoModelForCausalLM

    sdpa = AutoModelForCausalLM.from_pretrained(str(tmp_path / "mqa"), attn_implementation="sdpa").eval()
    torch.testing.assert_close(outputs(sdpa), outputs(eager), rtol=1e-4, atol=1e-5)
    mask = torch.ones_like(IDS)
    mask[0, :3] = 0  # left padding
    torch.testing.assert_close(outputs(sdpa, mask=mask)[mask.bool()], outputs(eager, mask=mask)[mask.bool()],
                               rtol=1e-4, atol=1e-5)
    generated = sdpa.generate(IDS[:1], max_new_tokens=6, do_sample=False)
    assert torch.equal(generated, greedy_without_cache(eager, 6))
    assert sdpa.transformer.h[0].attn.c_attn.weight.shape[1] == 64 + 2 * 16  # one KV head
    from kvslim.modeling import disable, enable

    reference = outputs(eager, mask=mask)
    enable(eager)  # kvslim's registered attention works in the hosted class too
    assert eager.config._attn_implementation == "kvslim_sdpa"
    torch.testing.assert_close(outputs(eager, mask=mask)[mask.bool()], reference[mask.bool()], rtol=1e-4, atol=1e-5)
    assert torch.equal(eager.generate(IDS[:1], max_new_tokens=6, do_sample=False), generated)
    disable(eager)
    assert eager.config._attn_implementation == "eager"


# ---- BERT ---------------------------------------------------------------------------------------


def test_bert_encoder_conversions_are_exact_where_they_should_be(save_model, tmp_path, text_file):
    model = bert()
    src = save_model(model, "bert")
    kvslim.convert(str(src), tmp_path / "same", to="mha", progress=False)
    same = load(tmp_path / "same", "base")
    assert type(same).__name__ == "KvslimBertModel"
    mask = torch.ones_like(IDS)
    mask[1, -4:] = 0  # padded encoder batch
    torch.testing.assert_close(outputs(same, mask=mask), outputs(model, mask=mask), rtol=0, atol=1e-5)

    for layer in range(2):
        make_groups_foldable(lambda: bert_views(model, layer), heads=4, group=4, seed=layer)
    src = save_model(model, "bert-foldable")
    kvslim.convert(str(src), tmp_path / "mqa", to="mqa", calib_data=str(text_file), **CALIB)
    kvslim.convert(str(src), tmp_path / "mean", to="mqa", method="mean", progress=False)
    mqa = load(tmp_path / "mqa", "base")
    assert mqa.encoder.layer[0].attention.self.key.weight.shape == (16, 64)
    torch.testing.assert_close(outputs(mqa, mask=mask), outputs(model, mask=mask), rtol=1e-4, atol=1e-4)
    assert (outputs(load(tmp_path / "mean", "base")) - outputs(model)).abs().max() > 1e-2
    from transformers import AutoModel

    sdpa = AutoModel.from_pretrained(str(tmp_path / "mqa"), attn_implementation="sdpa").eval()
    torch.testing.assert_close(outputs(sdpa, mask=mask)[mask.bool()], outputs(mqa, mask=mask)[mask.bool()],
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fresh_interpreter_outputs(tmp_path / "mqa", "base", tmp_path), outputs(mqa),
                               rtol=0, atol=1e-5)


def test_calibration_runs_without_dropout(save_model, text_file):
    """BERT, GPT-2 and OPT train with dropout 0.1; calibration statistics must not carry its noise."""
    from transformers import BertConfig, BertModel

    from kvslim.convert.adapters import get_adapter
    from kvslim.convert.calibration import LayerwiseRunner, calibration_windows
    from kvslim.convert.sources import open_source

    torch.manual_seed(0)
    config = BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=96,
                        vocab_size=320, max_position_embeddings=128)
    assert config.hidden_dropout_prob > 0
    source = open_source(str(save_model(BertModel(config).eval(), "bert-dropout")), None)
    ids, _ = calibration_windows(source, str(text_file), 8, 32)
    runners = [LayerwiseRunner(source, ids, adapter=get_adapter("bert")) for _ in range(2)]
    assert not any(m.training for m in runners[0].model.modules())
    assert runners[0].batch_size == 4096 // 32  # batches hold about as many tokens whatever the window length
    for h0, h1 in zip(runners[0].hidden, runners[1].hidden):
        assert torch.equal(h0, h1)
    moments = [r.attention_input_moment(1, "attention") for r in runners]
    assert torch.equal(moments[0], moments[1])


# ---- Phi-3 (Transformers' own class expresses GQA: the output stays a plain Phi-3) ---------------


@pytest.mark.parametrize("partial", [1.0, 0.5])
def test_phi3_fused_qkv(save_model, tmp_path, text_file, partial):
    model = phi3(heads=4, kv_heads=2, partial_rotary_factor=partial)
    src = save_model(model, "phi3")
    kvslim.convert(str(src), tmp_path / "mha", to="mha", progress=False)
    mha = load(tmp_path / "mha")
    assert type(mha).__name__ == "Phi3ForCausalLM" and mha.config.num_key_value_heads == 4
    torch.testing.assert_close(outputs(mha), outputs(model), rtol=0, atol=1e-5)
    kvslim.convert(str(src), tmp_path / "mqa", to="mqa", calib_data=str(text_file), **CALIB)
    mqa = load(tmp_path / "mqa")
    assert mqa.model.layers[0].self_attn.qkv_proj.weight.shape == (4 * 16 + 2 * 16, 64)
    assert not (tmp_path / "mqa" / "modeling_kvslim_gpt2.py").exists() and "auto_map" not in mqa.config.to_dict()
    error = (outputs(mqa) - outputs(model)).norm() / outputs(model).norm()
    mean_error = (outputs(load_mean(src, tmp_path)) - outputs(model)).norm() / outputs(model).norm()
    assert error < mean_error


def load_mean(src, tmp_path):
    kvslim.convert(str(src), tmp_path / "mean", to="mqa", method="mean", progress=False, overwrite=True)
    return load(tmp_path / "mean")


# ---- OPT ------------------------------------------------------------------------------------------


def opt_views(model, layer):
    a = model.model.decoder.layers[layer].self_attn
    return (a.q_proj.weight.data, a.q_proj.bias.data, a.k_proj.weight.data, a.k_proj.bias.data,
            a.v_proj.weight.data, a.v_proj.bias.data, a.out_proj.weight.data)


def test_opt_gqa_is_exact_where_it_should_be_and_loads_remotely(save_model, tmp_path, text_file):
    model = opt()
    src = save_model(model, "opt")
    kvslim.convert(str(src), tmp_path / "same", to="mha", progress=False)
    torch.testing.assert_close(outputs(load(tmp_path / "same")), outputs(model), rtol=0, atol=1e-5)
    for layer in range(2):
        make_groups_foldable(lambda: opt_views(model, layer), heads=4, group=2, seed=layer)
    src = save_model(model, "opt-foldable")
    kvslim.convert(str(src), tmp_path / "gqa", to="gqa", kv_heads=2, calib_data=str(text_file), regroup=False, **CALIB)
    gqa = load(tmp_path / "gqa")
    assert type(gqa).__name__ == "KvslimOPTForCausalLM"
    assert gqa.model.decoder.layers[0].self_attn.k_proj.weight.shape == (32, 64)
    torch.testing.assert_close(outputs(gqa), outputs(model), rtol=1e-4, atol=1e-4)
    assert torch.equal(gqa.generate(IDS[:1], max_new_tokens=5, do_sample=False), greedy_without_cache(gqa, 5))
    torch.testing.assert_close(fresh_interpreter_outputs(tmp_path / "gqa", "causal", tmp_path), outputs(gqa),
                               rtol=0, atol=1e-5)


# ---- GPT-NeoX / Pythia (fused per-head interleaved qkv, partial rotary) ---------------------------


def test_gpt_neox_identity_duplicates_and_aware(save_model, tmp_path, text_file):
    model = neox()
    src = save_model(model, "neox")
    kvslim.convert(str(src), tmp_path / "same", to="mha", progress=False)
    same = load(tmp_path / "same")
    assert type(same).__name__ == "KvslimGPTNeoXForCausalLM"
    torch.testing.assert_close(outputs(same), outputs(model), rtol=0, atol=1e-5)

    kvslim.convert(str(src), tmp_path / "aware", to="mqa", calib_data=str(text_file), **CALIB)
    kvslim.convert(str(src), tmp_path / "mean", to="mqa", method="mean", progress=False)
    ref = outputs(model)
    err = {n: float((outputs(load(tmp_path / n)) - ref).norm() / ref.norm()) for n in ("aware", "mean")}
    assert err["aware"] < err["mean"]

    with torch.no_grad():  # heads 2k and 2k+1 read the same key and value: merging them is exact
        for layer in model.gpt_neox.layers:
            w = layer.attention.query_key_value.weight.view(4, 3, 16, 64)
            b = layer.attention.query_key_value.bias.view(4, 3, 16)
            for h in (1, 3):
                w[h, 1:] = w[h - 1, 1:]
                b[h, 1:] = b[h - 1, 1:]
    src = save_model(model, "neox-dup")
    kvslim.convert(str(src), tmp_path / "gqa", to="gqa", kv_heads=2, method="mean", progress=False)
    gqa = load(tmp_path / "gqa")
    torch.testing.assert_close(outputs(gqa), outputs(model), rtol=0, atol=1e-5)
    torch.testing.assert_close(fresh_interpreter_outputs(tmp_path / "gqa", "causal", tmp_path), outputs(gqa),
                               rtol=0, atol=1e-5)


# ---- MLA for the hosted architectures without RoPE (GPT-2, OPT, BERT) ------------------------------


@pytest.mark.parametrize("arch", ["gpt2", "opt", "bert"])
def test_hosted_mla_full_rank_is_exact_and_caches_only_the_latent(arch, save_model, tmp_path, text_file):
    model = {"gpt2": gpt2, "opt": opt, "bert": bert}[arch]()
    kind = "base" if arch == "bert" else "causal"
    src = save_model(model, arch)
    kvslim.convert(str(src), tmp_path / "full", to="mla", kv_rank=65, calib_data=str(text_file), **CALIB)
    full = load(tmp_path / "full", kind)
    assert full.config.kv_lora_rank == 65 and full.config.model_type == f"kvslim_{arch}"
    torch.testing.assert_close(outputs(full), outputs(model), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fresh_interpreter_outputs(tmp_path / "full", kind, tmp_path), outputs(full),
                               rtol=0, atol=1e-5)

    uniform = kvslim.convert(str(src), tmp_path / "uniform", to="mla", kv_budget=0.25, calib_data=str(text_file),
                             **CALIB)  # the default without RoPE: one rank
    assert uniform.mla["kv_rank"] == 32 and uniform.mla["allocation"]["kind"] == "uniform"
    record = kvslim.convert(str(src), tmp_path / "quarter", to="mla", kv_budget=0.25, allocation="per-layer",
                            calib_data=str(text_file), calib_samples=8, calib_seq_len=32, refine_steps=5,
                            progress=False)
    ranks = record.mla["kv_rank"]  # per layer, all of the budget: 2 layers x 32
    assert record.mla["allocation"]["kind"] == "per-layer" and len(ranks) == 2 and sum(ranks) == 64
    assert record.kv_bytes_per_token_after * 4 == record.kv_bytes_per_token_before
    quarter = load(tmp_path / "quarter", kind)
    assert quarter.config.kv_lora_rank == ranks
    assert kvslim.describe(quarter.config).kv_bytes_per_token == record.kv_bytes_per_token_after
    if kind == "causal":  # absorbed decode over the latent cache == full forwards without a cache
        from transformers import DynamicCache

        cache = DynamicCache(config=quarter.config)
        with torch.no_grad():
            quarter(input_ids=IDS, past_key_values=cache, use_cache=True)
        for layer, rank in zip(cache.layers, ranks):
            assert layer.keys.shape == (2, 1, IDS.shape[1], rank) and layer.values.numel() == 0  # only the latent
        want = greedy_without_cache(quarter, 5)
        for cache in ("dynamic", "static"):
            generated = quarter.generate(IDS[:1], max_new_tokens=5, do_sample=False, cache_implementation=cache)
            assert torch.equal(generated, want)


def test_hosted_mla_bad_input(save_model, tmp_path):
    src = save_model(gpt2(), "gpt2")
    with pytest.raises(kvslim.ConversionError, match="impossible"):
        kvslim.convert(str(src), tmp_path / "o", to="mla", kv_rank=500, progress=False)
    with pytest.raises(kvslim.ConversionError, match="no rotary"):
        kvslim.convert(str(src), tmp_path / "o", to="mla", kv_rank=8, rope_dim=4, progress=False)
    with pytest.raises(kvslim.ConversionError, match="rank 1 to"):
        kvslim.convert(str(src), tmp_path / "o", to="mla", kv_budget=0.001, progress=False)
    assert not (tmp_path / "o").exists()


def test_roberta_encoder(save_model, tmp_path, text_file):
    from transformers import RobertaConfig, RobertaModel

    torch.manual_seed(0)
    model = RobertaModel(RobertaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=96,
                                       vocab_size=320, max_position_embeddings=130, pad_token_id=1,
                                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).eval()
    src = save_model(model, "roberta")
    kvslim.convert(str(src), tmp_path / "same", to="mha", progress=False)
    same = load(tmp_path / "same", "base")
    assert type(same).__name__ == "KvslimRobertaModel"
    torch.testing.assert_close(outputs(same), outputs(model), rtol=0, atol=1e-5)
    kvslim.convert(str(src), tmp_path / "mqa", to="mqa", calib_data=str(text_file), **CALIB)
    kvslim.convert(str(src), tmp_path / "mean", to="mqa", method="mean", progress=False)
    ref = outputs(model)
    err = {n: float((outputs(load(tmp_path / n, "base")) - ref).norm() / ref.norm()) for n in ("mqa", "mean")}
    assert err["mqa"] < err["mean"]
    torch.testing.assert_close(fresh_interpreter_outputs(tmp_path / "mqa", "base", tmp_path),
                               outputs(load(tmp_path / "mqa", "base")), rtol=0, atol=1e-5)


def test_phi3_to_deepseek_mla(save_model, tmp_path, text_file):
    model = phi3(heads=4, kv_heads=1)  # one KV head: a single shared RoPE key reproduces it exactly
    src = save_model(model, "phi3")
    kvslim.convert(str(src), tmp_path / "mla", to="mla", kv_rank=65, rope_dim=16, calib_data=str(text_file), **CALIB)
    out = load(tmp_path / "mla")  # plain Transformers DeepseekV3: the fused gate_up_proj was split
    assert type(out).__name__ == "DeepseekV3ForCausalLM"
    torch.testing.assert_close(outputs(out), outputs(model), rtol=0, atol=2e-4)
    # partial rotary: DeepseekV3 has no place for the free dims; kvslim's hosted Phi-3 keeps them exact
    model = phi3(heads=4, kv_heads=1, partial_rotary_factor=0.5)
    partial = save_model(model, "phi3-partial")
    kvslim.convert(str(partial), tmp_path / "partial", to="mla", kv_rank=65, rope_dim=8, calib_data=str(text_file),
                   **CALIB)
    out = load(tmp_path / "partial")
    assert type(out).__name__ == "KvslimPhi3ForCausalLM"
    torch.testing.assert_close(outputs(out), outputs(model), rtol=0, atol=2e-4)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_moe_calibrated_gqa_keeps_every_expert(arch, save_model, tmp_path, text_file):
    """MoE checkpoints hold one tensor per expert where the modules fuse them; calibration loads
    those through Transformers, and the output keeps every non-attention tensor unchanged."""
    from safetensors.torch import load_file


    src = save_model(make_model(arch, 8, 4), arch)
    record = kvslim.convert(str(src), tmp_path / "gqa", to="gqa", kv_heads=2, calib_data=str(text_file),
                            calib_samples=8, calib_seq_len=32, refine_steps=5, progress=False)
    assert record.refinement is not None and record.calibration["samples"] == 8
    before, after = load_file(src / "model.safetensors"), load_file(tmp_path / "gqa" / "model.safetensors")
    assert set(after) == set(before)
    for name, tensor in before.items():
        if ".self_attn." not in name:
            assert torch.equal(after[name], tensor), name
    out = load(tmp_path / "gqa")
    assert out.config.num_key_value_heads == 2
    assert torch.equal(out.generate(IDS[:1], max_new_tokens=4, do_sample=False), greedy_without_cache(out, 4))
