"""MMCA-GQA semantics, checked numerically against a plain reference computation."""

from __future__ import annotations

import pytest
import torch

from kvslim.convert.mmca import mmca_from_attention
from kvslim.modeling import MMCACache, SimpleMMCA

DIM, HEADS = 32, 4


def reference(m: SimpleMMCA, v, t, vkeep=None, tkeep=None):
    """Per-head explicit matrices, K/V repeated for every query head, two softmaxes."""
    b, nv, _ = v.shape
    nt = t.shape[1]
    vkeep = torch.ones(b, nv, dtype=torch.bool) if vkeep is None else vkeep
    tkeep = torch.ones(b, nt, dtype=torch.bool) if tkeep is None else tkeep
    hd, rep = m.head_dim, m.heads // m.kv_heads

    def heads(x, proj, n):
        return proj(x).view(b, -1, n, hd).transpose(1, 2)

    out_v, out_t = torch.zeros(b, nv, DIM), torch.zeros(b, nt, DIM)
    for bi in range(b):
        qv, kv_, vv = heads(v, m.q_proj, m.heads)[bi], heads(v, m.k_proj, m.kv_heads)[bi], heads(v, m.v_proj, m.kv_heads)[bi]
        qt, kt, vt = heads(t, m.q_proj, m.heads)[bi], heads(t, m.k_proj, m.kv_heads)[bi], heads(t, m.v_proj, m.kv_heads)[bi]
        per_head_v, per_head_t = [], []
        for h in range(m.heads):
            g = h // rep
            sv = qv[h] @ kv_[g].T * m.scale
            allow = vkeep[bi][None, :].expand(nv, nv) | torch.eye(nv, dtype=torch.bool)
            per_head_v.append(sv.masked_fill(~allow, -torch.inf).softmax(-1) @ vv[g])
            stt = (qt[h] @ kt[g].T * m.scale).masked_fill(~(tkeep[bi][None, :] & torch.ones(nt, nt, dtype=torch.bool).tril()), -torch.inf)
            stv = (qt[h] @ kv_[g].T * m.scale).masked_fill(~vkeep[bi][None, :], -torch.inf)
            w = m.image_weight if vkeep[bi].any() else 0.0
            per_head_t.append((1 - w) * torch.nan_to_num(stt.softmax(-1)) @ vt[g] + w * torch.nan_to_num(stv.softmax(-1)) @ vv[g])
        out_v[bi] = m.o_proj(torch.cat(per_head_v, -1)) * vkeep[bi][:, None]
        out_t[bi] = m.o_proj(torch.cat(per_head_t, -1)) * tkeep[bi][:, None]
    return out_v, out_t


def make(kv_heads=2, **kwargs):
    torch.manual_seed(0)
    return SimpleMMCA(DIM, HEADS, kv_heads=kv_heads, dropout=0.0, **kwargs).eval()


def inputs(b=2, nv=5, nt=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, nv, DIM, generator=g), torch.randn(b, nt, DIM, generator=g)


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
@pytest.mark.parametrize("nv,nt", [(5, 7), (9, 3), (1, 12)])
def test_matches_reference(kv_heads, nv, nt):
    m = make(kv_heads)
    v, t = inputs(nv=nv, nt=nt)
    got, want = m(v, t), reference(m, v, t)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=0)


def test_matches_reference_with_padding_masks():
    m = make(2)
    v, t = inputs(nv=6, nt=8)
    vkeep = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)  # 2nd: no image at all
    tkeep = torch.tensor([[1] * 8, [1] * 5 + [0] * 3], dtype=torch.bool)
    got, want = m(v, t, vkeep, tkeep), reference(m, v, t, vkeep, tkeep)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=0)
    # padded visual tokens are invisible: changing them changes nothing
    v2 = v.clone()
    v2[0, 4:] += 10
    assert torch.allclose(m(v2, t, vkeep, tkeep)[1], got[1], atol=1e-6)


def test_text_is_causal_and_sees_every_visual_token():
    m = make(2)
    v, t = inputs(b=1)
    v.requires_grad_(True)
    t.requires_grad_(True)
    _, out = m(v, t)
    for i in range(t.shape[1]):
        gv, gt = torch.autograd.grad(out[0, i].sum(), (v, t), retain_graph=True)
        assert (gt[0, i + 1:].abs().sum(-1) == 0).all()  # never sees text j > i
        assert (gt[0, : i + 1].abs().sum(-1) > 0).all()
        assert (gv[0].abs().sum(-1) > 0).all()  # sees every visual token


def test_two_normalisations_are_separate():
    m = make(2)
    v, t = inputs(b=1, nt=12)
    for nt in (1, 4, 12):
        image_w, text_w = m.attention_weights(v, t[:, :nt])
        torch.testing.assert_close(image_w.sum(-1), torch.full((1, HEADS, nt), m.image_weight))
        torch.testing.assert_close(text_w.sum(-1), torch.full((1, HEADS, nt), 1 - m.image_weight))
    # image weights of the first text tokens do not change when more text follows
    torch.testing.assert_close(m.attention_weights(v, t[:, :4])[0], m.attention_weights(v, t)[0][:, :, :4])


def test_visual_outputs_do_not_depend_on_text():
    m = make(2)
    v, t = inputs(nt=4)
    _, t2 = inputs(nt=9, seed=5)
    torch.testing.assert_close(m(v, t)[0], m(v, t2)[0])


def test_visual_attention_none_keeps_tokens_apart():
    m = make(2, visual_attention="none")
    v, t = inputs()
    v2 = v.clone()
    v2[:, 1:] += 5
    torch.testing.assert_close(m(v, t)[0][:, 0], m(v2, t)[0][:, 0])


@pytest.mark.parametrize("rope", [None, 10000.0])
def test_cached_decoding_equals_full_recomputation(rope):
    m = make(2, rope_theta=rope)
    v, t = inputs(nt=9)
    full_v, full_t = m(v, t)
    cache = MMCACache()
    outs = [m(v, t[:, :4], cache=cache)[1]]
    visual_k = cache.visual_k
    for i in range(4, 9):
        vis, step = m(None, t[:, i:i + 1], cache=cache)
        outs.append(step)
    assert cache.visual_k is visual_k  # the image K/V was computed once
    torch.testing.assert_close(torch.cat(outs, 1), full_t, atol=1e-5, rtol=0)
    torch.testing.assert_close(vis, full_v)
    assert cache.text_length == 9
    assert cache.kv_bytes() == 2 * (5 + 9) * 2 * m.head_dim * 2 * 4  # (K+V) x tokens x kv_heads x hd x batch x fp32


def test_gqa_with_kv_heads_equal_heads_is_mha():
    gqa = make(HEADS)
    v, t = inputs()
    # the same layer computed as plain multi-head attention (every head its own K/V)
    want = reference(gqa, v, t)
    torch.testing.assert_close(gqa(v, t)[1], want[1], atol=1e-5, rtol=0)
    # and a GQA layer built by merging identical KV heads of an MHA layer gives the same outputs
    mha = make(HEADS)
    with torch.no_grad():
        for proj in (mha.k_proj, mha.v_proj):
            w = proj.weight.view(HEADS, -1, DIM)
            w[1], w[3] = w[0].clone(), w[2].clone()
    merged = make(2)
    with torch.no_grad():
        merged.q_proj.weight.copy_(mha.q_proj.weight)
        merged.o_proj.weight.copy_(mha.o_proj.weight)
        for src, dst in ((mha.k_proj, merged.k_proj), (mha.v_proj, merged.v_proj)):
            dst.weight.copy_(src.weight.view(HEADS, -1, DIM)[[0, 2]].reshape(-1, DIM))
    torch.testing.assert_close(merged(v, t)[1], mha(v, t)[1], atol=1e-5, rtol=0)


def test_gradients_flow_to_every_parameter():
    m = make(2, qk_norm=True)
    m.train()
    v, t = inputs()
    vo, to = m(v, t)
    (vo.pow(2).mean() + to.pow(2).mean()).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_drop_in_signature_and_init_from_pretrained_attention():
    layer = SimpleMMCA(DIM, HEADS, kv_heads=2, dropout=0.1, causal=True, qk_norm=False, flash=False)
    visual_out, text_out = layer(*inputs())
    assert visual_out.shape == (2, 5, DIM) and text_out.shape == (2, 7, DIM)
    with pytest.raises(ValueError, match="must divide"):
        SimpleMMCA(DIM, HEADS, kv_heads=3)

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=DIM, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=HEADS, num_key_value_heads=2, head_dim=8)
    attn = LlamaForCausalLM(config).model.layers[0].self_attn
    same = mmca_from_attention(attn, kv_heads=2)  # same KV heads: a pure copy
    v, t = inputs()
    assert same.rope_theta == 10000.0 and same.kv_heads == 2
    assert torch.equal(same.k_proj.weight, attn.k_proj.weight)
    mqa = mmca_from_attention(attn, kv_heads=1)
    assert mqa.k_proj.weight.shape == (8, DIM) and torch.isfinite(mqa(v, t)[1]).all()


def test_pretrained_init_reproduces_the_decoder_layer_under_the_mmca_mask():
    """With no (unpadded) image, MMCA's text attention is exactly the decoder's causal attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=DIM, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=HEADS, num_key_value_heads=4, head_dim=8)
    model = LlamaForCausalLM(config)
    attn = model.model.layers[0].self_attn
    layer = mmca_from_attention(attn, kv_heads=4)
    v, t = inputs(b=1, nv=3, nt=6)
    no_image = torch.zeros(1, 3, dtype=torch.bool)
    _, got = layer(v, t, visual_mask=no_image)
    positions = torch.arange(3, 9)[None]  # text sits after the 3 image positions
    pe = model.model.rotary_emb(t, positions)
    mask = torch.full((6, 6), float("-inf")).triu(1)[None, None]
    want = attn(hidden_states=t, position_embeddings=pe, attention_mask=mask)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def _mla_and_equivalent_gqa(rope=None):
    torch.manual_seed(0)
    mla = SimpleMMCA(DIM, HEADS, kv_heads=2, dropout=0.0, kv_rank=12, rope_theta=rope).eval()
    gqa = SimpleMMCA(DIM, HEADS, kv_heads=2, dropout=0.0, rope_theta=rope).eval()
    with torch.no_grad():
        gqa.q_proj.weight.copy_(mla.q_proj.weight)
        gqa.o_proj.weight.copy_(mla.o_proj.weight)
        gqa.k_proj.weight.copy_(mla.k_up.weight @ mla.kv_down.weight)
        gqa.v_proj.weight.copy_(mla.v_up.weight @ mla.kv_down.weight)
    return mla, gqa


def test_mla_variant_equals_gqa_with_composed_weights():
    mla, gqa = _mla_and_equivalent_gqa()
    v, t = inputs()
    for got, want in zip(mla(v, t), gqa(v, t)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("rope", [None, 10000.0])
def test_mla_variant_caches_only_the_latent(rope):
    mla, _ = _mla_and_equivalent_gqa(rope)
    v, t = inputs(nt=9)
    _, full = mla(v, t)
    cache = MMCACache()
    outs = [mla(v, t[:, :3], cache=cache)[1]] + [mla(None, t[:, i:i + 1], cache=cache)[1] for i in range(3, 9)]
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=0)
    assert cache.text_length == 9
    assert cache.kv_bytes() == (5 + 9) * 12 * 2 * 4  # tokens x latent rank x batch x fp32: no K/V heads
