"""kvslim attention vs Transformers' eager path: GQA SDPA and absorbed MLA decoding."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import kvslim.modeling as km

from common import make_model

IDS = torch.randint(3, 320, (2, 10), generator=torch.Generator().manual_seed(0))
PADDED = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1, 1], [1] * 10])  # left padding in the first row


def tiny_deepseek(seed: int = 0, rank: int = 24, rope: int = 8):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    config = DeepseekV3Config(
        vocab_size=320, hidden_size=64, intermediate_size=96, moe_intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=1, n_shared_experts=1, num_experts_per_tok=1,
        n_group=1, topk_group=1, first_k_dense_replace=2, kv_lora_rank=rank, q_lora_rank=None,
        qk_rope_head_dim=rope, qk_nope_head_dim=16, v_head_dim=16, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, attention_bias=True)
    model = DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial latent norm weights
        for layer in model.model.layers:
            layer.self_attn.kv_a_layernorm.weight.uniform_(0.5, 1.5)
    return model


def _logits(model, ids, mask=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


# ---- GQA -------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type,kv", [("llama", 2), ("llama", 1), ("qwen2", 4), ("gemma3_text", 2)])
def test_gqa_sdpa_matches_eager_with_padding(model_type, kv):
    model = make_model(model_type, 8, kv)
    want = _logits(model, IDS, PADDED)
    km.enable(model)
    assert model.config._attn_implementation == km.IMPLEMENTATION
    got = _logits(model, IDS, PADDED)
    keep = PADDED.bool()
    torch.testing.assert_close(got[keep], want[keep], atol=1e-4, rtol=0)
    km.disable(model)
    assert model.config._attn_implementation == "eager"


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_gqa_sdpa_greedy_generate_matches_eager(cache):
    model = make_model("llama", 8, 2)
    kwargs = dict(attention_mask=PADDED, max_new_tokens=8, do_sample=False, pad_token_id=0,
                  cache_implementation=cache)
    want = model.generate(IDS, **kwargs)
    km.enable(model)
    got = model.generate(IDS, **kwargs)
    assert torch.equal(got, want)


def test_gqa_sdpa_training_gradients_match_eager():
    model = make_model("llama", 8, 2)
    model.train()
    ids = IDS[:, :8]

    def grads():
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    want = grads()
    km.enable(model)
    got = grads()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4)


def test_registered_implementation_loads_by_name(save_model, tmp_path):
    from transformers import AutoModelForCausalLM

    model = make_model("llama", 8, 2)
    src = save_model(model)
    loaded = AutoModelForCausalLM.from_pretrained(str(src), attn_implementation=km.IMPLEMENTATION)
    torch.testing.assert_close(_logits(loaded, IDS), _logits(model, IDS), atol=1e-4, rtol=0)


# ---- MLA ---------------------------------------------------------------------------------------


def test_absorbed_and_expanded_match_transformers_at_prefill():
    model = tiny_deepseek()
    want = _logits(model, IDS, PADDED)
    keep = PADDED.bool()
    for mode in ("absorbed", "expanded"):
        km.enable(model, mla_mode=mode)
        torch.testing.assert_close(_logits(model, IDS, PADDED)[keep], want[keep], atol=1e-4, rtol=0)
        km.disable(model)


def test_absorbed_decode_matches_expanded_at_every_step_and_caches_only_the_latent():
    model = tiny_deepseek()
    ids, mask = IDS[:, :6], PADDED[:, 3:9].clone()
    caches, steps = {}, {}
    for mode in ("original", "auto"):
        if mode != "original":
            km.enable(model, mla_mode=mode)
        cache = DynamicCache(config=model.config)
        out = []
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True).logits[:, -1]
            cur_mask = mask
            for _ in range(6):
                nxt = logits.argmax(-1, keepdim=True)
                cur_mask = torch.cat([cur_mask, torch.ones_like(nxt)], 1)
                logits = model(input_ids=nxt, attention_mask=cur_mask, past_key_values=cache, use_cache=True).logits[:, -1]
                out.append(logits)
        steps[mode], caches[mode] = out, cache
        km.disable(model)
    for a, b in zip(steps["original"], steps["auto"]):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=0)
    for layer in caches["auto"].layers:
        assert layer.keys.shape == (2, 1, 12, 24)  # normalised latent
        assert layer.values.shape == (2, 1, 12, 8)  # shared RoPE key


def test_enable_is_explicit_and_reversible():
    model = tiny_deepseek()
    keys = list(model.state_dict())
    before = _logits(model, IDS)
    km.enable(model)
    assert all(isinstance(layer.self_attn, km.AbsorbedMLAAttention) for layer in model.model.layers)
    assert list(model.state_dict()) == keys  # same parameters, same names: save_pretrained unchanged
    assert model.model.layers[0].self_attn.kv_b_proj is not None
    km.disable(model)
    assert all(type(layer.self_attn).__name__ == "DeepseekV3Attention" for layer in model.model.layers)
    torch.testing.assert_close(_logits(model, IDS), before, atol=0, rtol=0)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_absorbed_generate_matches_transformers(cache):
    model = tiny_deepseek(seed=3)
    kwargs = dict(attention_mask=PADDED, max_new_tokens=8, do_sample=False, pad_token_id=0,
                  cache_implementation=cache)
    want = model.generate(IDS, **kwargs)
    km.enable(model)
    got = model.generate(IDS, **kwargs)
    assert torch.equal(got, want)


def test_absorbed_training_gradients_match_expanded():
    model = tiny_deepseek()
    model.train()
    ids = IDS[:, :8]
    grads = {}
    for mode in ("expanded", "absorbed"):
        km.enable(model, mla_mode=mode)
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        km.disable(model)
    for name, g in grads["expanded"].items():
        torch.testing.assert_close(grads["absorbed"][name], g, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ["flash", "flex"])
def test_gpu_kernels_fall_back_with_a_notice_on_cpu(backend, caplog):
    model = make_model("llama", 8, 2)
    want = _logits(model, IDS)
    with caplog.at_level("WARNING", logger="kvslim"):
        km.enable(model, backend=backend)
    assert model.config._attn_implementation == km.IMPLEMENTATION
    assert "using kvslim_sdpa instead" in caplog.text
    torch.testing.assert_close(_logits(model, IDS), want, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="backend must be one of"):
        km.choose_backend("magic")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU-only: FlashAttention / FlexAttention kernels")
@pytest.mark.parametrize("backend", ["flash", "flex"])
def test_gpu_kernels_match_sdpa(backend):
    model = make_model("llama", 8, 2).cuda().to(torch.bfloat16)
    want = _logits(model, IDS.cuda())
    km.enable(model, backend=backend)
    torch.testing.assert_close(_logits(model, IDS.cuda()).float(), want.float(), atol=5e-2, rtol=0)
