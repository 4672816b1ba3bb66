"""MHA/GQA -> DeepSeek-style multi-head latent attention (MLA) for one layer.

Target (Transformers' DeepseekV3Attention, q_lora_rank=None): per head i

    score_i = scale * ( q_nope_i . k_nope_i  +  rope(q_rope_i) . rope(k_rope) )
    [k_nope_i; v_i] = kv_b_proj_i( norm(c) ),   [c; k_rope] = kv_a_proj_with_mqa(x)

so the cache per token and layer holds the latent c and one RoPE key shared by all heads.

Source, per head i and RoPE frequency pair f (complex notation, q_if, k_if in C):

    score_i = scale_src * sum_f Re( q_if conj(k_if) e^{i theta_f (m - n)} )

The conversion, in three steps:

1. **Shared RoPE key.** DeepseekV3's rotary embedding is a geometric sequence of frequencies,
   so the kept source frequencies must be an arithmetic progression of pair indices
   (f0, f0+s, ...): expressed exactly by `rope_theta = base^(s*dr/hd)` and linear scaling
   `base^(2 f0/hd)`. At each kept frequency the heads' keys are concentrated into one shared key
   (strategy ``rotate``: rank-1 complex PCA across heads, each head's complex scalar folded into
   its q, since mixing heads at one frequency commutes with RoPE; strategy ``partial``:
   MHA2MLA-style selection by query/key 2-norm and a plain energy-weighted mean, no folds).
2. **NoPE remainder.** Whatever RoPE no longer carries (the residual of the rank-1 fit, and whole
   frequencies that are not kept) goes into the un-rotated part, with the query scaled by
   beta_f = E[cos(theta_f * distance)], the least-squares best constant stand-in for the
   rotation it loses (1 for slow frequencies, 0 for fast ones).
3. **Joint latent.** [K_nope; V] of all heads is one linear map of x, factored through rank r:
   ``whitened`` (default) minimises the error of the scores (keys weighted by each head's query
   covariance) and of the layer output (values weighted by each head's o_proj Gram) under the
   calibration input covariance; ``pca`` is TransMLA's activation PCA with K/V norm balancing;
   ``svd`` is MHA2MLA's weight-only SVD.

``kv_a_layernorm`` RMS-normalises the latent per token, which would distort every key and value.
kvslim adds one latent element holding a large constant ("anchor"), so the RMS is effectively a
fixed number and the norm becomes an exact-to-~1e-6 rescale, undone by its weight. It costs one
cache element per token and layer, counted in the budget. The same trick handles a query bias
(Qwen2) through q_lora (q_a_proj -> q_a_layernorm -> q_b_proj) with a full-rank identity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .adapters import AttentionLayout, AttentionWeights
from .errors import ConversionError
from .gqa import (
    from_complex,
    head_views,
    merge_keys_aware,
    pair_indices,
    query_energy,
    query_key_views,
    query_views,
    row_energy,
    sym_sqrt,
    to_complex,
)

INITS = ("whitened", "pca", "svd")
ROPE_STRATEGIES = ("rotate", "partial")
ANCHOR_SCALE = 1e3  # anchor value relative to the latent's RMS: distortion ~ 1 / (2 * 1e6)


@dataclass(frozen=True)
class MLAShape:
    kv_rank: int  # latent elements carrying information (the anchor adds one more)
    rope_dim: int  # dims of the shared RoPE key (2 per kept frequency pair)

    @property
    def cache_elements(self) -> int:
        return self.kv_rank + 1 + self.rope_dim


def max_latent_rank(layout: AttentionLayout, hidden: int) -> int:
    """[K; V] of all heads acting on [x, 1] has at most this rank."""
    return min(2 * layout.num_heads * layout.head_dim, hidden + 1)


def check_rank(kv_rank: int, layout: AttentionLayout, hidden: int) -> None:
    if not 1 <= kv_rank <= max_latent_rank(layout, hidden):
        raise ConversionError(
            f"--kv-rank {kv_rank} is impossible for this model: the latent can have rank 1 to "
            f"{max_latent_rank(layout, hidden)} (min of 2 * heads * head_dim = "
            f"{2 * layout.num_heads * layout.head_dim} and hidden + 1 = {hidden + 1})."
        )


def check_shape(shape: MLAShape, layout: AttentionLayout, hidden: int, rotary_dims: int | None = None) -> None:
    """`rotary_dims`: dims of a head that RoPE rotates (partial rotary: fewer than the head dim)."""
    hd = layout.head_dim
    rotary_dims = rotary_dims or hd
    if shape.rope_dim < 2 or shape.rope_dim % 2 or shape.rope_dim > rotary_dims:
        limit = f"head dim {hd}" if rotary_dims == hd else f"{rotary_dims} rotary dims of a head"
        raise ConversionError(
            f"--rope-dim {shape.rope_dim} is invalid: it must be even, at least 2 and at most the "
            f"{limit} (one RoPE key shared by all heads)."
        )
    check_rank(shape.kv_rank, layout, hidden)


def budget_elements(budget: float, layout: AttentionLayout) -> int:
    """Cache elements per token and layer that `budget` x the source's KV cache allows."""
    return int(math.floor(budget * 2 * layout.num_kv_heads * layout.head_dim + 1e-9))


def shape_for_budget(budget: float, layout: AttentionLayout, hidden: int, rope_dim: int | None = None, *,
                     rotary_dims: int | None = None, reserved: int = 1, reserved_what: str = "anchor") -> MLAShape:
    """Largest latent whose cache (rank + RoPE dims + `reserved` other elements: DeepseekV3's
    anchor, or the hosted q/k-norm classes' key-norm scales) fits `budget` x the source's KV cache."""
    source = 2 * layout.num_kv_heads * layout.head_dim
    elements = budget_elements(budget, layout)
    if rope_dim is None:
        # A third of the cache for the shared RoPE key, two thirds for the latent (capped at the
        # rotary dims). Measured closed form, SmolLM2 at 1/4 (95 elements, head dim 64): RoPE
        # 24/28/32/36/40/48/64 -> perplexity 130/112/112/113/119/131/148; llama-mha-gutenberg at
        # 1/8 (63, head dim 32): 16/24/32 -> 124/122/123.
        rope_dim = min(rotary_dims or layout.head_dim, max(2, 2 * int((elements - reserved) / 6 + 0.5)))
    minimum = rope_dim + 1 + reserved
    if elements < minimum:
        other = f" + {reserved_what} {reserved}" if reserved else ""
        raise ConversionError(
            f"--kv-budget {budget:g} leaves {elements} cache elements per token and layer; MLA needs at "
            f"least {minimum} (RoPE dims {rope_dim} + latent rank 1{other}), i.e. a budget >= "
            f"{minimum / source:.4f} of the source's {source}."
        )
    rank = min(elements - reserved - rope_dim, max_latent_rank(layout, hidden))
    return MLAShape(rank, rope_dim)


def rope_progression(score: torch.Tensor, pairs: int) -> tuple[int, int]:
    """Arithmetic progression (0, stride) of `pairs` frequency indices maximising `score`.

    It always starts at the fastest pair: the highest frequencies carry local (previous-token)
    attention, whose worth the energy score underrates (SmolLM2 at 1/4, 16 pairs: starting at
    pair 2 gave perplexity 378.8, while 18 pairs from pair 0 gave 113.3).
    """
    n = score.shape[0]
    best, arg = -math.inf, (0, 1)
    for stride in range(1, n + 1):
        if (pairs - 1) * stride >= n:  # the progression no longer fits
            break
        total = float(score[: (pairs - 1) * stride + 1: stride].sum())
        if total > best:
            best, arg = total, (0, stride)
    return arg


def rotation_keep_factor(theta: torch.Tensor, context: int) -> torch.Tensor:
    """beta_f = E[cos(theta_f * d)] for distances d uniform on [0, context)."""
    x = theta.double() * context
    return torch.where(x < 1e-8, torch.ones_like(x), torch.sin(x) / x.clamp(min=1e-30))


def shared_rope_key(q: torch.Tensor, k: torch.Tensor, cov: torch.Tensor, beta: torch.Tensor, strategy: str,
                    re: torch.Tensor, im: torch.Tensor):
    """The RoPE key all heads share, per frequency pair, and what keeping each pair is worth.

    q, k: per-head augmented weights (nh, hd, D). Returns (shared (F, D), folds (nh, F), residual
    keys (nh, F, D), gain (F,)), all complex except gain. ``rotate`` concentrates the heads by a
    rank-1 complex PCA (folds go into q); ``partial`` (MHA2MLA) takes an energy-weighted mean and
    ranks frequencies by query/key 2-norm.
    """
    nh, hd, D = k.shape
    F = re.shape[0]
    kc = to_complex(k, re, im)
    energy_q = query_energy(q, cov, re, im, None)  # (nh, F)
    energy_k = query_energy(k, cov, re, im, None)
    if strategy == "rotate":
        shared, folds = merge_keys_aware(kc, energy_q, cov, phase_only=False)
        resid = kc - folds[:, :, None] * shared[None]
        resid_energy = query_energy(from_complex(resid, re, im, hd), cov, re, im, None)
        # error if f is not kept: the whole key goes un-rotated; if kept: only the residual does
        gain = (1 - beta**2) * (energy_q * (energy_k - resid_energy)).sum(0)
    else:
        w = energy_q.T  # (F, nh)
        shared = torch.einsum("fh,hfd->fd", w.to(kc.dtype), kc) / w.sum(1, keepdim=True).clamp(min=1e-30)
        folds = torch.ones(nh, F, dtype=kc.dtype)
        resid = kc - shared[None]
        gain = (energy_q.sqrt() * energy_k.sqrt()).sum(0)
    return shared, folds, resid, gain


@dataclass
class MLALayer:
    """DeepseekV3 attention tensors of one layer (nn.Linear layout)."""

    q_proj: torch.Tensor | None
    q_a_proj: tuple[torch.Tensor, torch.Tensor] | None  # (weight, bias), query-bias models only
    q_a_norm: torch.Tensor | None
    q_b_proj: torch.Tensor | None
    kv_a_proj: torch.Tensor
    kv_a_bias: torch.Tensor | None  # None: bias-free (vLLM)
    kv_a_norm: torch.Tensor
    kv_b_proj: torch.Tensor
    o_proj: torch.Tensor
    o_bias: torch.Tensor | None
    rope_start: int
    rope_stride: int

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {
            f"{prefix}kv_a_proj_with_mqa.weight": self.kv_a_proj, f"{prefix}kv_a_proj_with_mqa.bias": self.kv_a_bias,
            f"{prefix}kv_a_layernorm.weight": self.kv_a_norm, f"{prefix}kv_b_proj.weight": self.kv_b_proj,
            f"{prefix}o_proj.weight": self.o_proj, f"{prefix}o_proj.bias": self.o_bias,
        }
        out = {name: t for name, t in out.items() if t is not None}
        if self.q_proj is not None:
            out[f"{prefix}q_proj.weight"] = self.q_proj
        else:
            out[f"{prefix}q_a_proj.weight"], out[f"{prefix}q_a_proj.bias"] = self.q_a_proj
            out[f"{prefix}q_a_layernorm.weight"] = self.q_a_norm
            out[f"{prefix}q_b_proj.weight"] = self.q_b_proj
        return out


def _anchor(rows: torch.Tensor, cov: torch.Tensor) -> tuple[float, float]:
    """(anchor value, norm weight) so RMSNorm([y, anchor]) * weight ~ y for y = rows @ [x, 1]."""
    energy = float(row_energy(rows, cov).sum()) / max(rows.shape[0], 1)
    n = rows.shape[0] + 1
    anchor = ANCHOR_SCALE * math.sqrt(max(energy, 1e-12) * n)
    return anchor, anchor / math.sqrt(n)


def row_weighting(q: torch.Tensor, o: torch.Tensor, cov: torch.Tensor, init: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The weighting of `joint_latent`'s rows and its inverse, one hd x hd block per head for its keys
    and one for its values ((2 nh, hd, hd) each): ``whitened`` weights each head's keys by the root
    of its query covariance (score error) and its values by the root of its o_proj Gram (output
    error); ``pca`` and ``svd`` weight nothing. q: (nh, hd, D); o: (nh, d_out, hd), any float dtype.
    Kept as blocks, so neither it nor its inverse is ever an (2 nh hd)^2 matrix."""
    f64 = torch.float64
    nh, hd, _ = q.shape
    if init != "whitened":
        eye = torch.eye(hd, dtype=f64).expand(2 * nh, hd, hd)
        return eye, eye
    roots = [sym_sqrt(qn @ cov @ qn.T) for qn in q] + [sym_sqrt(oi.to(f64).T @ oi.to(f64)) for oi in o]
    return torch.stack([r for r, _ in roots]), torch.stack([i for _, i in roots])


def joint_latent(kv, weighting: tuple[torch.Tensor, torch.Tensor], cov: torch.Tensor, rank: int,
                 init: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Factor [K; V] of all heads (each (nh, hd, D), acting on [x, 1]) through a rank-`rank` latent.

    `kv` is a function returning (K, V), called once per pass over them rather than its result held
    (at 7B each is 128 MiB of float64, and the eigendecomposition between the passes needs neither);
    `weighting` is `row_weighting`'s. Returns (down (r, D), up (2 nh hd, r)) with [K; V] ~ up @ down:
    the latent is c = down @ [x, 1]. ``whitened`` minimises the score and output errors under the
    input covariance; ``pca`` is TransMLA's activation PCA with K/V norm balancing; ``svd`` is
    MHA2MLA's weight-only SVD.
    """
    blocks, inverse = weighting
    nh, hd = blocks.shape[0] // 2, blocks.shape[1]
    D = cov.shape[0]
    f64 = torch.float64
    basis_cov = torch.eye(D, dtype=f64) if init == "svd" else cov
    scale = torch.ones(2 * nh, dtype=f64)  # one scalar per block: balances keys against values

    def rows(j: int, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # weighted rows of block j
        return scale[j] * (blocks[j] @ (k[j] if j < nh else v[j - nh]))

    def all_rows() -> torch.Tensor:
        k, v = kv()
        return torch.stack([rows(j, k, v) for j in range(2 * nh)])

    if 2 * nh * hd <= D:  # fewer rows than inputs: the rows x rows problem is the small one
        weighted = all_rows()
        if init != "svd":
            scale[:nh] = _key_balance(_energy(weighted[:nh], cov), _energy(weighted[nh:], cov))
            weighted[:nh] *= scale[:nh, None, None]
        top = principal_directions(weighted.reshape(-1, D), basis_cov, rank).reshape(2 * nh, hd, rank)
        down = top.reshape(-1, rank).T @ weighted.reshape(-1, D)
    else:
        # More rows than inputs (MHA: 2 x hidden): everything goes through the D x D Gram of the rows,
        # accumulated block by block, so the weighted rows (2 nh hd x D: 268 MB at 7B) never exist at once
        k, v = kv()
        key_gram = _gram(lambda j: rows(j, k, v), range(nh))
        gram = _gram(lambda j: rows(j, k, v), range(nh, 2 * nh))
        del k, v
        if init != "svd":  # E|row . x|^2 summed over rows = <gram, cov>
            scale[:nh] = _key_balance(float(torch.dot(key_gram.flatten(), cov.flatten())),
                                      float(torch.dot(gram.flatten(), cov.flatten())))
        gram.add_(key_gram, alpha=float(scale[0]) ** 2)
        del key_gram
        found = directions_from_gram(gram, basis_cov, rank)
        del gram
        if found is None:  # no positive definite moment even ridged: the rows x rows problem
            weighted = all_rows().reshape(-1, D)
            top = principal_directions(weighted, basis_cov, rank).reshape(2 * nh, hd, rank)
            down = top.reshape(-1, rank).T @ weighted
        else:
            mix, down = found
            k, v = kv()
            top = torch.stack([rows(j, k, v) @ mix for j in range(2 * nh)])
            del k, v
    up = ((inverse / scale[:, None, None]) @ top).reshape(2 * nh * hd, rank)
    return down, up


def _key_balance(key_energy: float, value_energy: float) -> float:
    """The scale that gives the keys the values' energy (floored: when RoPE carries the keys
    entirely, their remainder is round-off, not signal)."""
    return math.sqrt(value_energy / max(key_energy, 1e-12 * value_energy))


def _gram(rows, blocks) -> torch.Tensor:
    """sum over `blocks` of rows(j)^T rows(j): (D, D)."""
    total = None
    for j in blocks:
        r = rows(j)
        total = r.T @ r if total is None else total.addmm_(r.T, r)
    return total


def directions_from_gram(gram: torch.Tensor, cov: torch.Tensor, rank: int):
    """The top-`rank` eigenvectors of w @ cov @ w.T, from gram = w.T @ w (w: (n, D), n > D) alone.

    With cov = L L^T and B = w L, they are B v / |B v| for the top eigenvectors v of B^T B =
    L^T gram L: returns (mix (D, r), down (r, D)) with the eigenvectors = w @ mix and
    down = their transpose @ w, or None where cov is not positive definite even ridged. A singular
    cov is ridged (see RIDGE); directions the ridge chose rather than the data are zero columns."""
    for ridge in (0.0, RIDGE):
        chol = input_root(cov, ridge)
        if chol is None:
            continue
        vals, vecs = torch.linalg.eigh(chol.T @ gram @ chol)
        vals, vecs = vals[-rank:].flip(-1), vecs[:, -rank:].flip(-1)
        if float(vals[-1]) > 1e-9 * float(vals[0]):  # else a near-null direction: ridge it, or solve as is
            mix = (chol @ vecs).div_(vals.sqrt())
            down = mix.T @ gram
            if ridge:  # directions the ridge chose rather than the data carry nothing: latent rows of 0
                energy = row_energy(down, cov)
                empty = energy < ridge * cov.diagonal().mean() * down.pow(2).sum(1)
                mix[:, empty], down[empty] = 0, 0
            return mix, down
    return None


def principal_directions(w: torch.Tensor, cov: torch.Tensor, rank: int) -> torch.Tensor:
    """The top-`rank` eigenvectors of w @ cov @ w.T (w: (n, D)), largest first (zero columns past the
    rank of a singular cov, see RIDGE).

    With more rows than columns (MHA: 2 nh hd = 2 x hidden), the same vectors come from the D x D
    problem (`directions_from_gram`), an eigendecomposition of a quarter of the size (an eighth of
    the work)."""
    n, D = w.shape
    if n > D and rank <= D:
        found = directions_from_gram(w.T @ w, cov, rank)
        if found is not None:
            return w @ found[0]
    _, vecs = torch.linalg.eigh(w @ cov @ w.T)
    return vecs[:, -rank:].flip(-1)


# Fewer calibration tokens than input dims (8 x 128 tokens at hidden 4096) leave the input moment
# singular, and a latent rank beyond its rank has no data for its last directions. The n x n problem
# costs (2 x hidden)^2 float64 (537 MB at 7B, several times that in eigh's workspace); a ridge of 1e-4 x
# the mean variance keeps the D x D problem, and the directions without data are left zero (latent
# rows that are always 0, as the n x n route's null directions nearly were).
RIDGE = 1e-4


def input_root(cov: torch.Tensor, ridge: float = 0.0) -> torch.Tensor | None:
    """L with L L^T = cov + ridge x mean(diag cov) x I, or None where that is not positive definite."""
    if ridge:
        cov = cov + ridge * cov.diagonal().mean() * torch.eye(cov.shape[0], dtype=cov.dtype)
    chol, info = torch.linalg.cholesky_ex(cov)
    return None if int(info) else chol


@dataclass
class SharedRopeLatent:
    """Steps 1-3 of the conversion for one layer (see the module docstring), before packing."""

    kept: torch.Tensor  # (P,) indices into the source's frequency pairs
    start: int
    stride: int
    shared: torch.Tensor  # (F, D) complex: the shared key per frequency pair
    folds: torch.Tensor  # (nh, F) complex: each head's key ~ fold * shared at a kept pair
    beta: torch.Tensor  # (F,) query scale standing in for a dropped rotation
    down: torch.Tensor  # (r, D): latent = down @ [x, 1]
    up: torch.Tensor | None  # (2 nh hd, r): [k_nope of every head; v of every head] = up @ latent


def shared_rope_latent(views, cov, theta, pairs: int, rank: int, *, init: str, rope_strategy: str, context: int,
                       re: torch.Tensor, im: torch.Tensor, rope_window: tuple[int, int] | None = None) -> SharedRopeLatent:
    """views: a function returning the per-head weights (q, k, v, o) as `head_views` gives them (q,
    k, v: (nh, hd, D) on [x, 1]; o: (nh, d_out, hd)), called once per pass over them rather than its
    result held: at 7B each is 128 MiB of float64. theta: (F,) the source's frequency of each rotary
    pair (re, im); dims outside the pairs (partial rotary) carry no position and go to the
    un-rotated part whole."""
    beta = rotation_keep_factor(theta, context)  # (F,)
    # 1. shared RoPE key at an arithmetic progression of frequencies, with per-head folds
    q, k, _, o = views()
    shared, folds, _, gain = shared_rope_key(q, k, cov, beta, rope_strategy, re, im)
    start, stride = rope_window or rope_progression(gain, pairs)
    kept = torch.arange(start, start + pairs * stride, stride)
    weighting = row_weighting(nope_queries(q, beta, re, im), o, cov, init)
    del q, k, o

    # 2. un-rotated part of every head: residual at kept frequencies, whole key elsewhere
    def keys_and_values():
        _, k, v, _ = views()
        return nope_keys(k, key_residual(k, shared, folds, re, im), kept, re, im), v

    # 3. joint latent of [K_nope; V] (rows: nh*hd keys then nh*hd values)
    down, up = joint_latent(keys_and_values, weighting, cov, rank, init)
    return SharedRopeLatent(kept, int(start), int(stride), shared, folds, beta, down, up)


def key_residual(k, shared, folds, re, im) -> torch.Tensor:
    """(nh, F, D) complex: what each head's key keeps beyond fold * shared key, per frequency pair."""
    return to_complex(k, re, im) - folds[:, :, None] * shared[None]


def nope_keys(k, resid, kept, re, im) -> torch.Tensor:
    """(nh, hd, D): the keys RoPE no longer carries, the residual of the shared key at `kept` pairs
    and the whole key at the others (written over `k`, whose storage it takes)."""
    is_kept = torch.zeros(re.shape[0], dtype=torch.bool)
    is_kept[kept] = True
    k_nope_c = torch.where(is_kept[None, :, None], resid, to_complex(k, re, im))
    k[:, re], k[:, im] = k_nope_c.real, k_nope_c.imag
    return k


def nope_queries(q, beta, re, im) -> torch.Tensor:
    """(nh, hd, D): the queries of the un-rotated part, each pair scaled by beta."""
    q_nope_c = to_complex(q, re, im) * beta[None, :, None]
    q_nope = q.clone()
    q_nope[:, re], q_nope[:, im] = q_nope_c.real, q_nope_c.imag
    return q_nope


def gram_eigenvalues(w: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of w @ cov @ w.T (w: (n, D)), largest first, from the smaller of the two Grams (a
    singular cov is ridged as in `principal_directions`: the estimate moves by ~1e-4 of the spectrum)."""
    chol = input_root(cov)
    chol = input_root(cov, RIDGE) if chol is None else chol
    if chol is None:
        return torch.linalg.eigvalsh(w @ cov @ w.T).flip(-1).clamp(min=0)
    b = w @ chol
    vals = torch.linalg.eigvalsh(b.T @ b if b.shape[0] > b.shape[1] else b @ b.T).flip(-1).clamp(min=0)
    return torch.cat([vals, vals.new_zeros(max(0, min(w.shape) - vals.shape[0]))])


def latent_rope_errors(q, k, v, o, cov, theta, pair_counts, *, rope_strategy: str, context: int,
                       re: torch.Tensor, im: torch.Tensor) -> dict[int, torch.Tensor]:
    """Estimated closed-form error of one layer for each count of kept RoPE pairs P in
    `pair_counts`, at every latent rank: {P: err} with err[r] for r = 0 .. max rank.

    The error is the relative score error plus the relative output error, the two terms the
    ``whitened`` latent minimises: with S the layer's score energy (sum over heads of
    E[(q . k)^2]) and O its value energy through o_proj,

        err(P, r) = lost_rotation(P) / S  +  sum_{i > r} lambda_i(P)

    where lost_rotation is (1 - beta_f^2) E|q_f|^2 E|k_f|^2 over the pairs P leaves un-rotated
    (and the cross-head residual at kept ones), and lambda(P) are the eigenvalues of the Gram of
    [K_nope weighted by the queries / sqrt(S); V weighted by o_proj / sqrt(O)] under the input
    moment: what a rank-r latent cannot carry."""
    nh, hd, D = k.shape
    beta = rotation_keep_factor(theta, context)
    _, _, resid, gain = shared_rope_key(q, k, cov, beta, rope_strategy, re, im)
    energy_q = query_energy(q, cov, re, im, None)
    dropped_cost = (1 - beta**2) * (energy_q * query_energy(k, cov, re, im, None)).sum(0)  # (F,)
    kept_cost = (1 - beta**2) * (energy_q * query_energy(from_complex(resid, re, im, hd), cov, re, im, None)).sum(0)
    score = _energy(_query_roots(q, cov) @ k, cov)
    key_blocks = _query_roots(nope_queries(q, beta, re, im), cov) / math.sqrt(score)
    values = _value_rows(v, o, cov)
    out = {}
    for pairs in pair_counts:
        start, stride = rope_progression(gain, pairs)
        kept = torch.arange(start, start + pairs * stride, stride)
        is_kept = torch.zeros_like(dropped_cost, dtype=torch.bool)
        is_kept[kept] = True
        lost = float(torch.where(is_kept, kept_cost, dropped_cost).sum()) / score
        k_nope = nope_keys(k.clone(), resid, kept, re, im)
        out[pairs] = lost + _tail(torch.cat([key_blocks @ k_nope, values]).reshape(2 * nh * hd, D), cov)
    return out


def latent_errors(q, k, v, o, cov) -> torch.Tensor:
    """`latent_rope_errors` without RoPE (GPT-2, OPT, BERT): err[r], r = 0 .. max rank, the relative
    score + output error a rank-r latent of [K; V] leaves."""
    nh, hd, D = k.shape
    keys = _query_roots(q, cov) @ k
    keys = keys / math.sqrt(_energy(keys, cov))
    return _tail(torch.cat([keys, _value_rows(v, o, cov)]).reshape(2 * nh * hd, D), cov)


def _query_roots(q, cov) -> torch.Tensor:
    """Per head, (q cov q^T)^(1/2): weighting a key by it measures the scores' error."""
    return torch.stack([sym_sqrt(qn @ cov @ qn.T)[0] for qn in q])


def _energy(rows, cov) -> float:
    """Sum of E[(row . [x, 1])^2] over `rows` (..., D): with keys weighted by `_query_roots`, the
    heads' summed E[(q . k)^2] for query and key inputs drawn independently."""
    return float(row_energy(rows, cov).sum().clamp(min=1e-30))


def _value_rows(v, o, cov) -> torch.Tensor:
    """Values weighted by each head's o_proj Gram, scaled to unit output energy."""
    values = torch.stack([sym_sqrt(oi.T @ oi)[0] for oi in o]) @ v
    return values / math.sqrt(_energy(values, cov))


def _tail(rows, cov) -> torch.Tensor:
    """tail[r] = sum of the Gram's eigenvalues beyond the r largest, r = 0 .. their count."""
    lam = gram_eigenvalues(rows, cov)
    return torch.cat([lam.flip(0).cumsum(0).flip(0), lam.new_zeros(1)])


def head_norm_scale(w: torch.Tensor, cov: torch.Tensor, eps: float) -> torch.Tensor:
    """Typical 1/rms of each head's output of w (nh, hd, D) under the input moment: what a per-head
    RMSNorm multiplies it by, on average."""
    energy = row_energy(w, cov).sum(1) / w.shape[1]
    return (energy.clamp(min=0) + eps).rsqrt()


def norm_gains(weights: AttentionWeights, layout: AttentionLayout, cov: torch.Tensor,
               norm_eps: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """With per-head q/k RMSNorms, what they multiply each query head and source KV head by on
    average (`head_norm_scale`; their per-token deviation is cached); None without q/k-norm."""
    if weights.k_norm is None:
        return None
    q, k = query_key_views(weights, layout)
    return head_norm_scale(q, cov, norm_eps), head_norm_scale(k[:: layout.group_size], cov, norm_eps)


def normalised_head_views(weights: AttentionWeights, layout: AttentionLayout, gains, o_float64: bool = True):
    """`head_views` (q, k, v, o) of the keys and queries the hosted class factors: with q/k-norm,
    scaled by `norm_gains` and the norms' weights."""
    q, k, v, o = head_views(weights, layout, o_float64)
    if gains is None:
        return q, k, v, o
    f64 = torch.float64
    q_gain, k_gain = gains
    q = q.mul_(q_gain[:, None, None] * weights.q_norm.to(f64)[None, :, None])
    k = k.mul_(k_gain.repeat_interleave(layout.group_size)[:, None, None] * weights.k_norm.to(f64)[None, :, None])
    return q, k, v, o


def latent_rope_layer_errors(weights: AttentionWeights, layout: AttentionLayout, theta: torch.Tensor,
                             cov: torch.Tensor, pair_counts, *, rope_strategy: str = "rotate", context: int = 512,
                             rope_layout: str = "half", norm_eps: float = 1e-6) -> dict[int, torch.Tensor]:
    """`latent_rope_errors` of one source layer, on what `convert_attention_latent_rope` factors."""
    cov = cov.to(torch.float64)
    q, k, v, o = normalised_head_views(weights, layout, norm_gains(weights, layout, cov, norm_eps))
    re, im = pair_indices(layout.head_dim, rope_layout)
    return latent_rope_errors(q, k, v, o, cov.to(torch.float64), theta, pair_counts, rope_strategy=rope_strategy,
                              context=context, re=re, im=im)


def convert_attention_latent_rope(weights: AttentionWeights, layout: AttentionLayout, rank: int, rope_dim: int,
                                  theta: torch.Tensor, *, cov: torch.Tensor | None = None, init: str = "whitened",
                                  rope_strategy: str = "rotate", context: int = 512, rope_layout: str = "half",
                                  rope_window: tuple[int, int] | None = None,
                                  norm_eps: float = 1e-6) -> tuple[dict[str, torch.Tensor], tuple[int, int]]:
    """Tensors of kvslim's hosted `LatentRopeAttention` (names relative to the module) for one layer,
    and the (start, stride) of the RoPE pairs it keeps.

    Unlike DeepseekV3, the hosted module keeps the source's query path (q_proj, per-head q-norm,
    its scaling) and rotates with the source's own cos/sin, so no temperature or frequency
    constraint applies beyond DeepSeek's single shared RoPE key. With a per-head key RMSNorm
    (`weights.k_norm`), the latent factors the key before the norm, scaled by the norm's typical
    gain; the module caches each token's actual gain relative to it, which keeps full rank exact.
    """
    if init not in INITS:
        raise ConversionError(f"Unknown MLA init '{init}'; valid: {', '.join(INITS)}.")
    if rope_strategy not in ROPE_STRATEGIES:
        raise ConversionError(f"Unknown RoPE strategy '{rope_strategy}'; valid: {', '.join(ROPE_STRATEGIES)}.")
    nh, hd = layout.num_heads, layout.head_dim
    d = weights.q_w.shape[1]
    f64 = torch.float64
    cov = torch.eye(d + 1, dtype=f64) if cov is None else cov.to(f64)
    re, im = pair_indices(hd, rope_layout)
    P = rope_dim // 2
    gains = norm_gains(weights, layout, cov, norm_eps)
    tensors: dict[str, torch.Tensor] = {}
    if gains is not None:
        k_gain = gains[1]
        tensors["q_norm"] = weights.q_norm
        tensors["k_norm_proj.weight"] = weights.k_w
        if weights.k_b is not None:
            tensors["k_norm_proj.bias"] = weights.k_b
        tensors["key_scale_mean"] = 1 / k_gain
    rope = shared_rope_latent(lambda: normalised_head_views(weights, layout, gains, o_float64=False), cov, theta, P,
                              rank, init=init, rope_strategy=rope_strategy, context=context, re=re, im=im,
                              rope_window=rope_window)
    nope_scale = torch.ones(hd, dtype=f64)
    nope_scale[re] = nope_scale[im] = rope.beta
    fold = rope.folds.conj()[:, rope.kept]  # (nh, P) complex, applied to the source's query
    k_rope = rope.shared[rope.kept]  # (P, D) complex
    k_rope = torch.cat([k_rope.real, k_rope.imag])  # (2P, D) as [re; im]
    kv_b = torch.cat([rope.up[: nh * hd].reshape(nh, hd, rank), rope.up[nh * hd:].reshape(nh, hd, rank)], dim=1)
    dtype = weights.q_w.dtype
    tensors.update({
        "q_proj.weight": weights.q_w, "q_nope_scale": nope_scale, "q_rope_fold": torch.stack([fold.real, fold.imag]),
        "kv_a_proj.weight": rope.down[:, :d], "kv_a_proj.bias": rope.down[:, d],
        "kv_b_proj.weight": kv_b.reshape(nh * 2 * hd, rank), "k_rope_proj.weight": k_rope[:, :d],
        "k_rope_proj.bias": k_rope[:, d], "o_proj.weight": weights.o_w,
    })
    if weights.q_b is not None:
        tensors["q_proj.bias"] = weights.q_b
    if weights.o_b is not None:
        tensors["o_proj.bias"] = weights.o_b
    out = {name: t.to(dtype).contiguous() for name, t in tensors.items()}
    out["rope_re"], out["rope_im"] = re[rope.kept].clone(), im[rope.kept].clone()
    return out, (rope.start, rope.stride)


def convert_attention_latent(weights: AttentionWeights, layout: AttentionLayout, rank: int, *,
                             cov: torch.Tensor | None = None, init: str = "whitened") -> dict[str, torch.Tensor]:
    """MLA for attention without RoPE (GPT-2, OPT, BERT): keys and values of every head from one
    rank-`rank` latent; queries and the output projection are unchanged. Returns the latent
    tensors (nn.Linear layout): kv_a weight/bias (hidden -> r) and kv_b weight (r -> per head [k_h; v_h])."""
    if init not in INITS:
        raise ConversionError(f"Unknown MLA init '{init}'; valid: {', '.join(INITS)}.")
    nh, hd = layout.num_heads, layout.head_dim
    d = weights.q_w.shape[1]
    f64 = torch.float64
    cov = torch.eye(d + 1, dtype=f64) if cov is None else cov.to(f64)
    q, k, v, o = head_views(weights, layout)
    down, up = joint_latent(lambda: (k, v), row_weighting(q, o, cov, init), cov, rank, init)
    kv_b = torch.cat([up[: nh * hd].reshape(nh, hd, rank), up[nh * hd:].reshape(nh, hd, rank)], dim=1)
    dtype = weights.q_w.dtype
    return {"kv_a_weight": down[:, :d].to(dtype).contiguous(), "kv_a_bias": down[:, d].to(dtype).contiguous(),
            "kv_b_weight": kv_b.reshape(nh * 2 * hd, rank).to(dtype).contiguous()}


def convert_attention_mla(
    weights: AttentionWeights,
    layout: AttentionLayout,
    shape: MLAShape,
    theta: torch.Tensor,
    *,
    cov: torch.Tensor | None = None,
    init: str = "whitened",
    rope_strategy: str = "rotate",
    context: int = 512,
    source_scaling: float | None = None,
    rope_layout: str = "half",
    rope_window: tuple[int, int] | None = None,
    bias_free: bool = False,
    latent_rows: int | None = None,
) -> MLALayer:
    """One layer's MLA tensors. `theta` holds the source's RoPE frequency per pair (hd/2,).

    `bias_free` (vLLM's DeepSeek attention has no bias terms and drops bias tensors): every bias
    (the latent's anchor, folded K/V biases, a query bias) becomes a weight on the input through
    the least-squares constant of the input, u = argmin E[(u.x - 1)^2] = E[x x^T]^-1 E[x] on the
    calibration data; exact when u.x = 1, otherwise the latent's per-token scale varies with u.x
    (`constant_anchor` balances that against the latent's own spread), which refinement can absorb. `latent_rows`: pad the latent with zero rows
    to this size (a shape vLLM's kernels take, larger than the rank the source has)."""
    if init not in INITS:
        raise ConversionError(f"Unknown MLA init '{init}'; valid: {', '.join(INITS)}.")
    if rope_strategy not in ROPE_STRATEGIES:
        raise ConversionError(f"Unknown RoPE strategy '{rope_strategy}'; valid: {', '.join(ROPE_STRATEGIES)}.")
    nh, hd = layout.num_heads, layout.head_dim
    d = weights.q_w.shape[1]
    check_shape(shape, layout, d)
    f64 = torch.float64
    D = d + 1
    cov = torch.eye(D, dtype=f64) if cov is None else cov.to(f64)
    re, im = pair_indices(hd, rope_layout)
    P = shape.rope_dim // 2

    rope = shared_rope_latent(lambda: head_views(weights, layout, o_float64=False), cov, theta, P, shape.kv_rank,
                              init=init, rope_strategy=rope_strategy, context=context, re=re, im=im,
                              rope_window=rope_window)
    start, stride, down = rope.start, rope.stride, rope.down
    k_rope_c = rope.shared[rope.kept]  # (P, D)

    # latent norm: an anchor element keeps the per-token RMS (near) constant. With biases it is a
    # constant; bias-free, every bias reads the input's least-squares constant u.x, the anchor too,
    # at the share of the RMS that u.x's fit supports
    kv_a = torch.cat([down, torch.zeros(1, D, dtype=f64), from_complex(k_rope_c[None], *_interleaved(2 * P), 2 * P)[0]])
    if bias_free:
        u = constant_direction(cov)
        kv_a = torch.cat([kv_a[:, :d] + kv_a[:, d:] * u[None], torch.zeros(kv_a.shape[0], 1, dtype=f64)], dim=1)
        anchor, norm_w = constant_anchor(kv_a[:shape.kv_rank, :d], cov)
        kv_a[shape.kv_rank, :d] = anchor * u
    else:
        anchor, norm_w = _anchor(down, cov)
        kv_a[shape.kv_rank, d] = anchor
    kv_norm = torch.full((shape.kv_rank + 1,), norm_w, dtype=f64)
    kv_norm[shape.kv_rank] = 1.0
    pad = (latent_rows or shape.kv_rank) - shape.kv_rank
    if pad > 0:  # zero latent rows: cached, never read; the norm weight keeps the RMS the anchor sets
        shrink = math.sqrt((shape.kv_rank + 1) / (shape.kv_rank + 1 + pad))  # the RMS is over more elements
        kv_a = torch.cat([kv_a[:shape.kv_rank], torch.zeros(pad, D, dtype=f64), kv_a[shape.kv_rank:]])
        kv_norm = torch.cat([kv_norm[:shape.kv_rank] * shrink, torch.zeros(pad, dtype=f64), kv_norm[shape.kv_rank:]])
    # per head [k_nope; v] from the latent; the padding rows and the anchor's column are never read
    kv_b = torch.zeros(nh, 2 * hd, shape.kv_rank + pad + 1, dtype=f64)
    kv_b[:, :hd, :shape.kv_rank] = rope.up[: nh * hd].reshape(nh, hd, -1)
    kv_b[:, hd:, :shape.kv_rank] = rope.up[nh * hd:].reshape(nh, hd, -1)
    rope.up = None

    # queries: [q_nope (hd) ; q_rope (2P, interleaved)] per head, rescaled to the source temperature
    scale_src = source_scaling if source_scaling is not None else hd**-0.5
    temperature = scale_src / (hd + 2 * P) ** -0.5
    q = query_views(weights, layout)  # (nh, hd, D), made again now that the latent's work is done
    q_full = torch.empty(nh, hd + 2 * P, D, dtype=f64)
    torch.mul(nope_queries(q, rope.beta, re, im), temperature, out=q_full[:, :hd])
    q_rope = to_complex(q, re, im)[:, rope.kept] * rope.folds.conj()[:, rope.kept, None]  # (nh, P, D)
    del q
    q_full[:, hd::2], q_full[:, hd + 1::2] = q_rope.real, q_rope.imag  # interleaved pairs
    q_full[:, hd:] *= temperature
    q_full = q_full.reshape(nh * (hd + 2 * P), D)

    out_dtype = weights.q_w.dtype

    def cast(t):
        return t.to(out_dtype).contiguous()

    o_bias = torch.zeros(weights.o_w.shape[0], dtype=f64)
    if bias_free:
        return MLALayer(
            q_proj=cast(q_full[:, :d] + q_full[:, d:] * u[None]), q_a_proj=None, q_a_norm=None, q_b_proj=None,
            kv_a_proj=cast(kv_a[:, :d]), kv_a_bias=None, kv_a_norm=cast(kv_norm),
            kv_b_proj=cast(kv_b.reshape(nh * 2 * hd, -1)), o_proj=cast(weights.o_w), o_bias=None,
            rope_start=int(start), rope_stride=int(stride),
        )
    if weights.q_b is None:
        q_proj, q_a, q_a_norm, q_b = cast(q_full[:, :d]), None, None, None
    else:  # query bias: q = q_b_proj(norm([x, anchor])) with an identity q_a_proj
        q_anchor, q_norm_w = _anchor(torch.eye(d, D, dtype=f64), cov)
        q_a_w = torch.cat([torch.eye(d, dtype=f64), torch.zeros(1, d, dtype=f64)])
        q_a_b = torch.zeros(d + 1, dtype=f64)
        q_a_b[d] = q_anchor
        q_a_norm_w = torch.full((d + 1,), q_norm_w, dtype=f64)
        q_a_norm_w[d] = 1.0
        # norm([x, anchor]) ~ [x, anchor / q_norm_w]: the last input carries the bias
        q_b_w = torch.cat([q_full[:, :d], q_full[:, d:] * q_norm_w / q_anchor], dim=1)
        q_proj, q_a, q_a_norm, q_b = None, (cast(q_a_w), cast(q_a_b)), cast(q_a_norm_w), cast(q_b_w)
    return MLALayer(
        q_proj=q_proj, q_a_proj=q_a, q_a_norm=q_a_norm, q_b_proj=q_b,
        kv_a_proj=cast(kv_a[:, :d]), kv_a_bias=cast(kv_a[:, d]), kv_a_norm=cast(kv_norm),
        kv_b_proj=cast(kv_b.reshape(nh * 2 * hd, -1)), o_proj=cast(weights.o_w), o_bias=cast(o_bias),
        rope_start=int(start), rope_stride=int(stride),
    )


def constant_direction(cov: torch.Tensor) -> torch.Tensor:
    """u minimising E[(u.x - 1)^2] under `cov` = E[[x, 1][x, 1]^T]: the linear read-out of the input
    that best reproduces a constant, which stands in for a bias where a runtime has none."""
    d = cov.shape[0] - 1
    m, mean = cov[:d, :d], cov[:d, d]
    ridge = 1e-9 * float(m.diagonal().mean()) * torch.eye(d, dtype=cov.dtype)
    return torch.linalg.solve(m + ridge, mean)


def constant_anchor(latent_rows: torch.Tensor, cov: torch.Tensor) -> tuple[float, float]:
    """(anchor scale A, latent norm weight) for a bias-free latent c = W x with the anchor A u.x.

    RMSNorm divides by the per-token RMS of [c, A u.x]; it is a constant (and the norm linear)
    when that RMS does not vary. Its two parts vary independently: |c|^2 with relative variance
    V_c ~ 2 tr(S^2) / tr(S)^2 (S = E[c c^T], Gaussian estimate), (u.x)^2 with V_a ~ 4 e^2 (e: the
    relative RMS error of u.x as 1). Giving the anchor the share w = V_c / (V_c + V_a) of the mean
    square minimises the variance of the sum; the norm weight then undoes the mean RMS."""
    d = cov.shape[0] - 1
    m = cov[:d, :d]
    s = latent_rows @ m @ latent_rows.T
    energy = float(s.trace())
    v_c = 2 * float((s @ s).trace()) / max(energy, 1e-30) ** 2
    fit = constant_fit(cov)
    q = max(1.0 - fit**2, 1e-12)  # E[(u.x)^2]
    share = min(v_c / max(v_c + 4 * fit**2, 1e-30), 1 - 1e-6)
    anchor = math.sqrt(share / (1 - share) * energy / q)
    n = latent_rows.shape[0] + 1
    return anchor, math.sqrt((energy + anchor**2 * q) / n)


def constant_fit(cov: torch.Tensor) -> float:
    """Relative RMS error of u.x as a constant (0: exact): sqrt(1 - mu^T M^-1 mu)."""
    d = cov.shape[0] - 1
    return math.sqrt(max(0.0, 1.0 - float(cov[:d, d] @ constant_direction(cov))))


def _interleaved(dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    return pair_indices(dim, "interleaved")
