"""MHA/GQA -> GQA/MQA/MHA weight transformation for one attention layer.

Every conversion is phrased over *query heads*: each query head first gets its own (virtual)
copy of the KV head it reads from, so a GQA source looks like an MHA source with duplicated
heads. A target with `t` KV heads then partitions the query heads into `t` equal groups, and
each group's K and V projections are merged into one.

Two merges:

* ``mean`` - the GQA paper's mean-pooling of the group's K and V projections.
* ``aware`` - activation-aware. Each query head keeps a private correction folded into its own
  weights, so the shared projection only has to span what the group has in common:

  - V: head i's value map ``V_i = X Wv_i`` may be replaced by ``V_g M_i`` for any matrix M_i,
    because ``M_i`` folds into the o_proj columns of head i. The best shared ``V_g`` is the top
    principal subspace of the group's stacked values, each weighted by its o_proj Gram matrix
    (what a value error costs at the layer output), under the calibration input covariance.
  - K: under RoPE only maps that commute with the rotation may be folded into q_proj: one
    complex scalar per frequency pair. Per frequency, the group's keys are complex time series
    ``k_i = X w_i``; the best shared key with per-head complex scalars is a rank-1 complex PCA,
    weighted by each head's query energy at that frequency (a key error at a frequency the query
    never uses costs nothing).

Both are closed-form (eigendecompositions in float64) and exact when the group's heads agree.
Biases are handled by augmenting the input with a constant 1, so a K/V bias is merged like any
other input direction. Models with per-head q/k RMSNorm (Qwen3, Gemma 3) only allow a phase
(rotation) to pass the query norm, so there the K fold is restricted to unit-modulus scalars;
this is exact when the q-norm weight is equal within each frequency pair and approximate
otherwise (recorded in the conversion record).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .adapters import AttentionLayout, AttentionWeights
from .errors import ConversionError

METHODS = ("aware", "mean")


def valid_kv_heads(num_heads: int) -> list[int]:
    return [n for n in range(1, num_heads + 1) if num_heads % n == 0]


def check_kv_heads(layout: AttentionLayout, kv_heads: int) -> None:
    if kv_heads < 1 or layout.num_heads % kv_heads:
        raise ConversionError(
            f"--kv-heads {kv_heads} does not divide the {layout.num_heads} query heads; "
            f"valid values: {', '.join(map(str, valid_kv_heads(layout.num_heads)))}."
        )


def default_groups(num_heads: int, kv_heads: int) -> list[list[int]]:
    """Neighbouring query heads share a KV head (the layout Transformers' GQA uses)."""
    size = num_heads // kv_heads
    return [list(range(g * size, (g + 1) * size)) for g in range(kv_heads)]


def check_groups(groups: list[list[int]], num_heads: int) -> None:
    flat = sorted(h for g in groups for h in g)
    sizes = {len(g) for g in groups}
    if flat != list(range(num_heads)) or len(sizes) != 1:
        raise ConversionError(
            f"groups must partition the {num_heads} query heads into equal-sized groups, got {groups}."
        )


def pair_indices(head_dim: int, rope_layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the real and imaginary dimension of each RoPE frequency pair.

    Layouts: "half" (dim f pairs with f + hd/2), "interleaved" (2f with 2f+1), "none" (no RoPE:
    learned or no positions), and "half:R" for partial rotary (GPT-NeoX, Phi): the first R dims
    rotate in the half convention, the rest carry no position.
    """
    if rope_layout == "none":
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty
    name, _, rotary = rope_layout.partition(":")
    dims = int(rotary) if rotary else head_dim
    if name == "half":
        half = dims // 2
        return torch.arange(half), torch.arange(half, dims)
    if name == "interleaved":
        return torch.arange(0, dims, 2), torch.arange(1, dims, 2)
    raise ValueError(f"unknown rope layout {rope_layout!r}")


def free_indices(head_dim: int, rope_layout: str) -> torch.Tensor:
    """Head dims that RoPE does not rotate (all of them without RoPE)."""
    re, im = pair_indices(head_dim, rope_layout)
    rotated = torch.zeros(head_dim, dtype=torch.bool)
    rotated[re] = rotated[im] = True
    return torch.nonzero(~rotated)[:, 0]


# ----------------------------------------------------------------------------------------------
# helpers over per-head views


def _augmented(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """[W | b]: weights acting on the input augmented with a constant 1."""
    b = bias if bias is not None else weight.new_zeros(weight.shape[0])
    return torch.cat([weight, b[:, None]], dim=1)


def _virtual_heads(w: torch.Tensor, layout: AttentionLayout) -> torch.Tensor:
    """(num_kv*hd, D) -> (num_heads, hd, D): the KV weights each query head reads."""
    per_kv = w.reshape(layout.num_kv_heads, layout.head_dim, -1)
    return per_kv.repeat_interleave(layout.group_size, dim=0)


def query_views(weights: AttentionWeights, layout: AttentionLayout) -> torch.Tensor:
    """q of `head_views` alone."""
    q = _augmented(weights.q_w.to(torch.float64), _opt64(weights.q_b))
    return q.reshape(layout.num_heads, layout.head_dim, -1)


def value_views(weights: AttentionWeights, layout: AttentionLayout) -> torch.Tensor:
    """v of `head_views` alone."""
    return _virtual_heads(_augmented(weights.v_w.to(torch.float64), _opt64(weights.v_b)), layout)


def query_key_views(weights: AttentionWeights, layout: AttentionLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k of `head_views` alone."""
    k = _virtual_heads(_augmented(weights.k_w.to(torch.float64), _opt64(weights.k_b)), layout)
    return query_views(weights, layout), k


def row_energy(w: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """E[(row . [x, 1])^2] of every row of w (..., n, D) under the moment `cov`, i.e. the diagonal of
    w cov w^T, an (n, D) slice at a time (no temporary the size of w: 128 MiB per head stack at 7B)."""
    flat = w.reshape(-1, *w.shape[-2:])
    return torch.stack([((m @ cov) * m).sum(-1) for m in flat]).reshape(w.shape[:-1])


def group_views(weights: AttentionWeights, layout: AttentionLayout, heads: torch.Tensor):
    """`head_views` (float64 q, k, v, o) of the query heads `heads` only, in that order."""
    f64 = torch.float64
    hd = layout.head_dim
    rows = (heads[:, None] * hd + torch.arange(hd)).flatten()  # their q_proj rows, o_proj columns
    kv_rows = ((heads // layout.group_size)[:, None] * hd + torch.arange(hd)).flatten()

    def aug(w, b, r):
        return _augmented(w[r].to(f64), _opt64(None if b is None else b[r])).reshape(len(heads), hd, -1)

    o = weights.o_w[:, rows].to(f64).reshape(-1, len(heads), hd).permute(1, 0, 2)
    return (aug(weights.q_w, weights.q_b, rows), aug(weights.k_w, weights.k_b, kv_rows),
            aug(weights.v_w, weights.v_b, kv_rows), o)


def head_views(weights: AttentionWeights, layout: AttentionLayout, o_float64: bool = True):
    """Per query head, float64, acting on the input augmented with a constant 1: q, k, v
    (num_heads, hd, D) - a GQA source's KV heads repeated for each query head that reads them -
    and o (num_heads, d_out, hd), each head's o_proj columns (with `o_float64=False` a view of the
    stored weight, for callers that only take per-head products of it)."""
    f64 = torch.float64
    nh, hd = layout.num_heads, layout.head_dim
    q, k = query_key_views(weights, layout)
    v = value_views(weights, layout)
    o = (weights.o_w.to(f64) if o_float64 else weights.o_w).reshape(-1, nh, hd).permute(1, 0, 2)
    return q, k, v, o


def to_complex(w: torch.Tensor, re: torch.Tensor, im: torch.Tensor) -> torch.Tensor:
    """(..., hd, D) real -> (..., hd/2, D) complex, one row per RoPE frequency."""
    return torch.complex(w[..., re, :], w[..., im, :])


def from_complex(wc: torch.Tensor, re: torch.Tensor, im: torch.Tensor, head_dim: int) -> torch.Tensor:
    out = wc.real.new_zeros(*wc.shape[:-2], head_dim, wc.shape[-1])
    out[..., re, :] = wc.real
    out[..., im, :] = wc.imag
    return out


def sym_sqrt(m: torch.Tensor, rel_eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric square root of a PSD matrix and its inverse (regularised)."""
    vals, vecs = torch.linalg.eigh(m)
    floor = rel_eps * vals.clamp(min=0).mean().clamp(min=1e-30)
    vals = vals.clamp(min=floor)
    root = (vecs * vals.sqrt()) @ vecs.T
    inv_root = (vecs / vals.sqrt()) @ vecs.T
    return root, inv_root


def query_energy(
    q_heads: torch.Tensor, cov: torch.Tensor, re: torch.Tensor, im: torch.Tensor,
    q_norm: torch.Tensor | None,
) -> torch.Tensor:
    """E|q_{i,f}|^2 per query head and RoPE frequency: (num_heads, hd/2)."""
    var = row_energy(q_heads, cov)  # per output dim
    if q_norm is not None:
        # After RMSNorm a head's dims have unit mean energy, then the norm weight scales them.
        var = var / var.mean(dim=1, keepdim=True).clamp(min=1e-30) * q_norm.double()[None] ** 2
    return (var[:, re] + var[:, im]).clamp(min=0)


# ----------------------------------------------------------------------------------------------
# merges of one group (members are query heads, each with its own virtual K/V weights)


def merge_keys_aware(
    k_members: torch.Tensor, energy: torch.Tensor, cov: torch.Tensor, phase_only: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared complex key weights (F, D) and per-member complex folds a (r, F) with k_i ~ a_i k_g.

    Minimises sum_i E_f[s_if^2 |k_i - a_i k_g|^2] with s_if^2 the query energy of head i.
    """
    s = energy.clamp(min=1e-12 * energy.max().clamp(min=1e-30)).sqrt()  # (r, F)
    gram = frequency_grams(k_members, cov)
    s_f = s.T.to(gram.dtype)  # (F, r)
    weighted = s_f[:, :, None] * gram * s_f[:, None, :]
    _, vecs = torch.linalg.eigh(weighted)
    p = vecs[..., -1]  # (F, r) top eigenvector per frequency
    shared = torch.einsum("fr,rfd->fd", s_f * p, k_members)
    folds = (p.conj() / s_f).T  # (r, F)
    if phase_only:
        # Only a rotation passes the query RMSNorm: keep the phases, refit the shared key for
        # unit-modulus folds (energy-weighted mean of the phase-aligned member keys).
        folds = folds / folds.abs().clamp(min=1e-30)
        w2 = (s.T**2).to(gram.dtype)  # (F, r)
        shared = torch.einsum("fr,rfd->fd", w2 * folds.T.conj(), k_members) / w2.sum(1, keepdim=True)
        return shared, folds
    # Fix the free complex scale per frequency so that identical heads give a_i = 1, k_g = k_i.
    scale = folds.mean(dim=0)
    rms = folds.abs().pow(2).mean(dim=0).sqrt()
    scale = torch.where(scale.abs() > 1e-6 * rms, scale, rms.to(scale.dtype))
    return shared * scale[:, None], folds / scale[None, :]


def merge_values_aware(
    v_members: torch.Tensor, o_members: torch.Tensor, cov: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared value weights (hd, D) and per-member maps M (r, hd, hd) with V_i ~ V_g M_i.

    Minimises sum_i E||(V_i - V_g M_i) Wo_i^T||^2: the error each head's value causes at the
    layer output, with Wo_i the head's o_proj columns.
    """
    r, hd, _ = v_members.shape
    roots, inv_roots = zip(*(sym_sqrt(o.T @ o) for o in o_members))
    # B = [Wv_i^T R_i]_i : (D, r*hd); Y' = X B are the output-weighted values.
    b = torch.cat([v.T @ root for v, root in zip(v_members, roots)], dim=1)
    vals, vecs = torch.linalg.eigh(b.T @ cov @ b)
    p = vecs[:, -hd:].flip(-1)  # top-hd principal directions, (r*hd, hd)
    shared_t = b @ p  # (D, hd)
    maps = torch.stack([p[i * hd:(i + 1) * hd].T @ inv_roots[i] for i in range(r)])
    # Rescale each shared dim to the members' average value energy (numerically friendlier).
    shared_var = torch.einsum("dk,de,ek->k", shared_t, cov, shared_t).clamp(min=1e-30)
    member_var = torch.einsum("rkd,de,rke->k", v_members, cov, v_members) / r
    t = (member_var.clamp(min=1e-30) / shared_var).sqrt()
    return (shared_t * t).T, maps / t[None, :, None]


def merge_keys_free(
    k_members: torch.Tensor, q_members: torch.Tensor, cov: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared key weights (n, D) for head dims RoPE does not rotate, and per-member maps (r, n, n).

    Without rotation any matrix passes into the query: q_i . k_i = (M_i q_i) . k_g when
    k_i ~ M_i^T k_g. The score error q_i . (k_i - M_i^T k_g) is the value merge's problem with the
    query's second moment E[q_i q_i^T] in place of the o_proj Gram, so it is solved the same way.
    """
    roots = torch.stack([sym_sqrt(qi @ cov @ qi.T)[0] for qi in q_members])  # (r, n, n), root^T root = E[q q^T]
    return merge_values_aware(k_members, roots, cov)


# ----------------------------------------------------------------------------------------------


def _identical(members) -> bool:
    """All of a group's members (a stacked tensor or a list) are the same tensor: their merge is that
    tensor, bit-exact. (torch.equal stops at the first member that differs.)"""
    return all(torch.equal(members[0], m) for m in members[1:])


def convert_attention(
    weights: AttentionWeights,
    layout: AttentionLayout,
    kv_heads: int,
    method: str = "aware",
    *,
    groups: list[list[int]] | None = None,
    cov: torch.Tensor | None = None,
    rope_layout: str = "half",
) -> AttentionWeights:
    """Convert one layer's attention to `kv_heads` KV heads.

    `groups` lists, per target KV head, the source query heads that will share it (default:
    neighbours). Query heads are permuted so each group is contiguous, which is exact because
    q_proj rows and o_proj columns move together. `cov` is the second moment (D x D, D =
    hidden + 1 with a trailing constant) of the attention input on calibration data; without
    it the aware merge uses an isotropic input (a weight-only merge).
    """
    check_kv_heads(layout, kv_heads)
    if method not in METHODS:
        raise ConversionError(f"Unknown method '{method}'; valid: {', '.join(METHODS)}.")
    nh, hd = layout.num_heads, layout.head_dim
    groups = groups or default_groups(nh, kv_heads)
    if len(groups) != kv_heads:
        raise ConversionError(f"{len(groups)} groups given for {kv_heads} KV heads.")
    check_groups(groups, nh)
    order = torch.tensor([h for g in groups for h in g])
    out_dtype = weights.q_w.dtype
    d = weights.q_w.shape[1]
    f64 = torch.float64

    if method == "mean":
        return _mean_merge(weights, layout, kv_heads, order)
    if cov is None:
        cov = torch.eye(d + 1, dtype=f64)
    cov = cov.to(f64)
    re, im = pair_indices(hd, rope_layout)
    free = free_indices(hd, rope_layout)
    rotated = torch.ones(hd, dtype=torch.bool)
    rotated[free] = False
    q_norm = None if weights.q_norm is None else weights.q_norm.to(f64)
    if q_norm is not None and len(free):
        raise ConversionError("q/k-norm models with un-rotated head dims are not supported.")

    # One group at a time, its members' float64 views made from the stored weights (all heads' views
    # are 512 MiB at 7B); the merged tensors are collected per group.
    size = nh // kv_heads
    new_q, new_k, new_v, new_o = [], [], [], []
    for g in range(kv_heads):
        q, k, v, o = group_views(weights, layout, order[g * size:(g + 1) * size])  # query heads regrouped
        if _identical(k) and _identical(v):
            new_k.append(k[0])
            new_v.append(v[0])
        else:
            energy = query_energy(q, cov, re, im, q_norm)
            shared_k = torch.zeros_like(k[0])
            if len(re):
                kc = to_complex(k, re, im)
                shared_c, folds = merge_keys_aware(kc, energy, cov, phase_only=q_norm is not None)
                shared_k[torch.cat([re, im])] = from_complex(shared_c, re, im, hd)[torch.cat([re, im])]
                qc = to_complex(q, re, im) * folds.conj()[:, :, None]
                q = torch.where(rotated[None, :, None], from_complex(qc, re, im, hd), q)
            if len(free):
                shared_free, maps = merge_keys_free(k[:, free], q[:, free], cov)
                shared_k[free] = shared_free
                q[:, free] = torch.einsum("rjk,rkd->rjd", maps, q[:, free])
            new_k.append(shared_k)
            shared_v, maps = merge_values_aware(v, o, cov)
            new_v.append(shared_v)
            o = torch.einsum("rok,rjk->roj", o, maps)  # Wo_i <- Wo_i M_i^T
        new_q.append(q.reshape(size * hd, d + 1).to(out_dtype))
        new_o.append(o.permute(1, 0, 2).reshape(o.shape[1], size * hd).to(out_dtype))

    k_aug = torch.stack(new_k).reshape(kv_heads * hd, d + 1)
    v_aug = torch.stack(new_v).reshape(kv_heads * hd, d + 1)
    q_aug = torch.cat(new_q)
    o_w = torch.cat(new_o, dim=1)

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(out_dtype).contiguous()

    return replace(
        weights,
        q_w=cast(q_aug[:, :d]),
        q_b=None if weights.q_b is None else cast(q_aug[:, d]),
        k_w=cast(k_aug[:, :d]),
        k_b=None if weights.k_b is None else cast(k_aug[:, d]),
        v_w=cast(v_aug[:, :d]),
        v_b=None if weights.v_b is None else cast(v_aug[:, d]),
        o_w=cast(o_w),
    )


def _mean_merge(weights: AttentionWeights, layout: AttentionLayout, kv_heads: int, order: torch.Tensor) -> AttentionWeights:
    """The GQA paper's mean-pooling: each new KV head is the mean of its group's (virtual) KV heads.
    Query and output weights only move with the regrouping, so they never leave their dtype: at 7B
    the float64 views of every projection cost more than the merge itself."""
    nh, hd = layout.num_heads, layout.head_dim
    kv_of_head = torch.arange(nh) // layout.group_size  # the source KV head each query head reads
    regrouped = not torch.equal(order, torch.arange(nh))

    def pooled(w: torch.Tensor | None) -> torch.Tensor | None:
        if w is None:
            return None
        heads = w.reshape(layout.num_kv_heads, hd, -1)
        merged = torch.empty(kv_heads, hd, heads.shape[-1], dtype=w.dtype)
        # A group at a time, compared in the stored dtype and averaged in float64 in one buffer that
        # every group reuses: a fresh float64 copy of the projection (128 MiB at 7B) cost ten times
        # the mean itself in page faults.
        buffer = torch.empty(nh // kv_heads, hd, heads.shape[-1], dtype=torch.float64)
        for g, members in enumerate(kv_of_head[order].reshape(kv_heads, -1).tolist()):
            if _identical([heads[h] for h in members]):
                merged[g] = heads[members[0]]
                continue
            for slot, h in enumerate(members):
                buffer[slot].copy_(heads[h])
            merged[g] = buffer.mean(0)
        return merged.reshape(kv_heads * hd, *w.shape[1:])

    def by_head(w: torch.Tensor | None, dim: int) -> torch.Tensor | None:
        if w is None or not regrouped:
            return w
        if dim == 0:
            return w.reshape(nh, hd, *w.shape[1:])[order].reshape(w.shape).contiguous()
        return w.reshape(w.shape[0], nh, hd)[:, order].reshape(w.shape).contiguous()

    return replace(weights, q_w=by_head(weights.q_w, 0), q_b=by_head(weights.q_b, 0),
                   k_w=pooled(weights.k_w), k_b=pooled(weights.k_b),
                   v_w=pooled(weights.v_w), v_b=pooled(weights.v_b), o_w=by_head(weights.o_w, 1))


def _opt64(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(torch.float64)


# ----------------------------------------------------------------------------------------------
# regrouping: which query heads share a KV head is a free choice


def frequency_grams(kc: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """(F, r, r): gram[f] = conj(K_f) cov K_f^T for complex per-frequency rows kc (r, F, D), one
    frequency at a time (cov is real: no complex copy of it)."""
    r, F, _ = kc.shape
    if F == 0:  # no RoPE
        return kc.new_zeros(0, r, r)
    return torch.stack([torch.complex(m.real @ cov, m.imag @ cov).conj() @ m.T for m in kc.unbind(1)])


def _subspace_gram(members, weights_sqrt, cov) -> torch.Tensor:
    """(nh, nh, n, n): cross-covariances of the weighted outputs of every pair of heads."""
    yb = torch.stack([m.T @ w for m, w in zip(members, weights_sqrt)])  # (nh, D, n)
    return torch.einsum("adk,de,bel->abkl", yb, cov, yb)


def pairwise_merge_cost(
    weights: AttentionWeights, layout: AttentionLayout, cov: torch.Tensor | None, rope_layout: str = "half"
) -> torch.Tensor:
    """(num_heads x num_heads) relative error of merging two query heads' K and V (aware merge).

    K cost: per frequency, the weighted energy the rank-1 complex fit leaves out; V cost: the
    output-weighted value energy outside the top head_dim principal directions. Each is divided
    by the layer's total so K and V count equally.
    """
    nh, hd = layout.num_heads, layout.head_dim
    d = weights.q_w.shape[1]
    f64 = torch.float64
    cov = torch.eye(d + 1, dtype=f64) if cov is None else cov.to(f64)
    re, im = pair_indices(hd, rope_layout)
    q_norm = None if weights.q_norm is None else weights.q_norm.to(f64)
    free = free_indices(hd, rope_layout)
    # the views one at a time where they can be (each is 128 MiB of float64 at 7B)
    q, k = query_key_views(weights, layout)
    s = query_energy(q, cov, re, im, q_norm).sqrt()  # (nh, F)
    kf_gram = _subspace_gram(k[:, free], [sym_sqrt(qi @ cov @ qi.T)[0] for qi in q[:, free]], cov) if len(free) else None
    del q
    k_gram = frequency_grams(to_complex(k, re, im) * s[:, :, None], cov)  # (F, nh, nh)
    del k
    k_diag = k_gram.diagonal(dim1=1, dim2=2).real  # (F, nh)
    v = value_views(weights, layout)
    o = weights.o_w.reshape(-1, nh, hd).permute(1, 0, 2)  # as stored; per head in float64 below
    v_gram = _subspace_gram(v, [sym_sqrt(oi.to(f64).T @ oi.to(f64))[0] for oi in o], cov)
    del v


    def residual(gram, a, b):  # energy outside the best shared subspace of one head's size
        n = gram.shape[-1]
        block = torch.cat([torch.cat([gram[a, a], gram[a, b]], 1), torch.cat([gram[b, a], gram[b, b]], 1)], 0)
        return torch.linalg.eigvalsh(block)[:n].clamp(min=0).sum()

    v_total = torch.einsum("aakk->", v_gram)
    k_total = k_diag.sum() + (torch.einsum("aakk->", kf_gram) if kf_gram is not None else 0)
    cost = torch.zeros(nh, nh, dtype=f64)
    for a in range(nh):
        for b in range(a + 1, nh):
            # smallest eigenvalue of each 2x2 Hermitian [[g_aa, g_ab], [g_ba, g_bb]]
            tr = k_diag[:, a] + k_diag[:, b]
            det = k_diag[:, a] * k_diag[:, b] - k_gram[:, a, b].abs() ** 2
            k_res = (tr / 2 - ((tr / 2) ** 2 - det).clamp(min=0).sqrt()).sum()
            if kf_gram is not None:
                k_res = k_res + residual(kf_gram, a, b)
            v_res = residual(v_gram, a, b)
            cost[a, b] = cost[b, a] = k_res / k_total.clamp(min=1e-30) + v_res / v_total.clamp(min=1e-30)
    return cost


def plan_groups(cost: torch.Tensor, kv_heads: int, max_swap_rounds: int = 20) -> list[list[int]]:
    """Balanced partition of heads into `kv_heads` groups with low within-group pairwise cost.

    Greedy seeding (cheapest pair, then the head cheapest to add) followed by pairwise swaps
    between groups while they lower the total cost.
    """
    nh = cost.shape[0]
    size = nh // kv_heads
    if size == 1 or kv_heads == 1:
        return default_groups(nh, kv_heads)
    free = set(range(nh))
    groups: list[list[int]] = []
    while free:
        ids = sorted(free)
        sub = cost[ids][:, ids] + torch.eye(len(ids), dtype=cost.dtype) * 1e30
        a, b = divmod(int(sub.argmin()), len(ids))
        group = [ids[a], ids[b]]
        while len(group) < size:
            rest = [h for h in ids if h not in group]
            group.append(min(rest, key=lambda h: float(cost[h, group].sum())))
        groups.append(group)
        free -= set(group)

    def within(g: list[int]) -> float:
        return float(cost[g][:, g].sum()) / 2

    for _ in range(max_swap_rounds):
        improved = False
        for gi in range(len(groups)):
            for gj in range(gi + 1, len(groups)):
                for x in list(groups[gi]):
                    for y in list(groups[gj]):
                        a = [h for h in groups[gi] if h != x] + [y]
                        b = [h for h in groups[gj] if h != y] + [x]
                        if within(a) + within(b) < within(groups[gi]) + within(groups[gj]) - 1e-12:
                            groups[gi], groups[gj] = a, b
                            improved = True
                            break
                    if improved:
                        break
        if not improved:
            break
    return sorted(sorted(g) for g in groups)
