"""Layer-local refinement: fit a converted attention layer to the source layer's outputs.

The closed-form merge is optimal for a proxy (key/value reconstruction). What the model needs is
the attention *output*: softmax ignores score shifts, and a key error only matters where it
changes which tokens a query attends to. Starting from the closed form, this fits the converted
layer's projections so that its attention output matches the source layer's on the same
calibration inputs. Only this layer's attention weights move; there is no LM loss and no
end-to-end training, and the result is still a plain checkpoint of the target shape.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, replace

import torch
from torch import nn
from tqdm.auto import tqdm


def _first(out):
    """An attention module's output tensor (modules return it alone or first in a tuple)."""
    return out[0] if isinstance(out, tuple) else out


def _attention_out(module: nn.Module, x: torch.Tensor, call: dict) -> torch.Tensor:
    return _first(module(hidden_states=x, **call))


def _rows(call: dict, rows: torch.Tensor, batch: int) -> dict:
    """Select the same sequences from batched arguments (e.g. a per-sequence mask)."""
    def pick(v):
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch > 1:
            return v[rows]
        if isinstance(v, tuple):
            return tuple(pick(x) for x in v)
        return v
    return {k: pick(v) for k, v in call.items()}


@dataclass(frozen=True)
class Effort:
    """How much refinement a quality level buys: steps of `batch_tokens` tokens (whole calibration
    windows, at least one) at step size `lr`, either a fixed count of `steps` or as many as fit in
    `time_share` times the closed form's time (`TimeBudget`), between `min_steps` and `max_epochs`
    passes over the calibration tokens."""

    batch_tokens: int
    lr: float
    steps: int | None = None
    time_share: float | None = None
    min_steps: int = 0
    max_epochs: float = 0.0

    def step_tokens(self, seq_len: int) -> int:
        return max(1, self.batch_tokens // seq_len) * seq_len

    def step_range(self, calib_tokens: int, seq_len: int) -> tuple[int, int]:
        """The fewest and the most steps: (steps, steps) for a fixed count."""
        if self.steps is not None:
            return self.steps, self.steps
        most = math.ceil(self.max_epochs * calib_tokens / self.step_tokens(seq_len))
        return self.min_steps, max(self.min_steps, most)


@dataclass(frozen=True)
class TimeBudget:
    """A layer's refinement time, in seconds, and the step counts allowed. The count is set from the
    steps' pace once PROBE steps are timed, and set again after every step until half of it is
    done (before the rate's decay starts): what fits once the time already spent is taken out. The
    final error pass is not: the calibration stream replays its outputs instead of computing the
    attention again, so it takes the place of work the closed form does too.
    The pace is the mean step without stalls (steps over STALL times the median): on a small model
    10 steps take 0.2 s, and with their plain mean a moment of other work on the cores set
    llama-mha-gutenberg -> GQA 8 -> 2 at 132 steps where quiet runs set 241-276; the median alone is
    too low (steps vary by tens of percent) and took MQA 8 -> 1 to 3.3x its closed form."""

    seconds: float
    fewest: int
    most: int
    closed_form: float | None = None  # the estimate the time was set from, for the record

    PROBE = 10  # steps timed before the first count (the first steps, which allocate, are not timed)
    SETTLED = 0.5  # of the count: from there on it stays
    STALL = 4.0  # a step this many times the median is another process's doing, not the pace

    @classmethod
    def pace(cls, durations: list[float]) -> float:
        typical = statistics.median(durations)
        return statistics.fmean(d for d in durations if d <= cls.STALL * typical)

    def steps(self, step_seconds: float, spent: float, done: int = 0) -> int:
        fit = done + int((self.seconds - spent) / step_seconds)
        return min(self.most, max(self.fewest, fit))


# Refinement takes about REFINE_TIME_SHARE times the closed form's time, so that the default conversion
# takes 2-3x its closed form whatever the model (2.1-2.9x measured: conversion_speed_summary.md). The
# closed form is estimated on the first layer, which runs slower than the rest on a small model
# (llama-mha-gutenberg: up to 25% over), so the share leaves room for that and for the machine: one
# conversion's time varies by +-15% between runs on 2 shared cores. At 1.8 (less the final error pass),
# llama-mha-gutenberg -> MQA 8 -> 1 took 3.04x its closed form, and at 1.6 -> GQA 8 -> 4 took 3.11x
# (refine_cost_gutenberg_*_share18.md, *_share16.md). No fixed step count holds the ratio:
# SmolLM2-135M -> MQA (64 x 512 calibration tokens) took 4.4x its closed form with 4 passes over the
# calibration tokens, where llama-mha-gutenberg -> GQA 8 -> 2 took 2.7x (its closed form carries a fixed
# overhead several times its per-layer work) and needed those 4 passes to stay within 0.5% of the
# earlier 300-step default (3 passes: +0.6%). The step count is set on the first layer and recorded;
# `--refine-steps N` repeats a conversion exactly.
# Small steps fit better for the same time: SmolLM2's first 8 layers -> MLA 1/4, swapped into the full
# model (WikiText-2 held-out perplexity, source 29.92, closed form 36.03), gave 31.09 with 400 steps of 512
# tokens against 31.29 with 100 of 2,048 (refine_batch_smollm2.md). Smaller steps want a smaller rate:
# llama-mha-gutenberg -> MLA 1/4 at 3 passes (192 steps of 512) 91.22 at lr 1e-2 and 91.66 at 2e-2;
# -> GQA 8 -> 2 at 4 passes 91.13 at 1.5e-2 and 91.23 at 1e-2 (refine_cost_gutenberg_epochs_sweep.md).
# `--quality max` is the earlier default: 300 steps of 2,048 tokens, at the larger rates it was tuned at.
REFINE_TOKENS = 512
REFINE_LR, REFINE_LR_HEAD_MERGE = 1e-2, 1.5e-2
REFINE_TIME_SHARE = 1.4
REFINE_EFFORT = {"default": Effort(REFINE_TOKENS, REFINE_LR, time_share=REFINE_TIME_SHARE, min_steps=25, max_epochs=8),
                 "max": Effort(2048, 2e-2, steps=300)}
REFINE_EFFORT_HEAD_MERGE = {"default": replace(REFINE_EFFORT["default"], lr=REFINE_LR_HEAD_MERGE),
                            "max": Effort(2048, 3e-2, steps=300)}
QUALITY_LEVELS = tuple(REFINE_EFFORT)
# Adam with short memories and a constant rate that decays linearly over the last 30% of the steps.
# llama-mha-gutenberg -> MLA 1/4, held-out perplexity: 91.18 at 100 steps, 90.58 at 300, where Adam's
# defaults (0.9, 0.999) under a cosine schedule at lr 3e-2 gave 90.95 at 300 (GQA 8 -> 2: 91.32 and
# 90.49 against 90.78). On SmolLM2's first 8 layers -> MLA 1/4 (96 steps of 512), neither a decay over
# all the steps (31.51 at lr 1.5e-2, 31.54 at 2e-2) nor betas (0.9, 0.99) (31.65) beat this (31.47).
REFINE_BETAS = (0.8, 0.95)
REFINE_DECAY = 0.3


class LeanAdam:
    """torch.optim.Adam's update of one tensor, with its two moments stored in bfloat16 and updated in
    float32 a slice at a time: an MLA layer's Adam state at 7B is 273 MiB instead of 546, and no
    temporary is the size of the tensor. Rounding the moments to 8 mantissa bits moves a step by
    ~0.4% of itself: llama-mha-gutenberg held-out perplexity, torch's Adam against this, MLA 1/4
    91.179 / 91.180 and GQA 8 -> 2 91.079 / 91.078 with per-layer errors equal to 4 digits
    (benchmarks/results/refine_cost_gutenberg_{mla,gqa}_lean_adam.md). `step` is the tensor's
    post-accumulate-grad hook: it steps and drops the gradient."""

    SLICE = 1 << 22  # elements updated at once (16 MiB in float32)

    def __init__(self, param: torch.Tensor, lr: float, betas: tuple[float, float], eps: float = 1e-8):
        self.lr, self.betas, self.eps, self.t, self.rate = lr, betas, eps, 0, 1.0
        self.m = torch.zeros_like(param, dtype=torch.bfloat16)
        self.v = torch.zeros_like(param, dtype=torch.bfloat16)

    @torch.no_grad()
    def step(self, param: torch.Tensor) -> None:
        self.t += 1
        b1, b2 = self.betas
        step_size = self.lr * self.rate / (1 - b1**self.t)
        root_correction = (1 - b2**self.t) ** 0.5
        flat = (param.view(-1), param.grad.view(-1), self.m.view(-1), self.v.view(-1))
        for p, g, m16, v16 in zip(*(t.split(self.SLICE) for t in flat)):
            m = m16.float().lerp_(g, 1 - b1)
            v = v16.float().mul_(b2).addcmul_(g, g, value=1 - b2)
            m16.copy_(m)
            v16.copy_(v)
            p.addcdiv_(m, v.sqrt_().div_(root_correction).add_(self.eps), value=-step_size)
        param.grad = None


@torch.no_grad()
def source_outputs(source: nn.Module, inputs: list[torch.Tensor], call: dict) -> list[torch.Tensor]:
    """What refinement fits: the source attention's output on each calibration batch (computed
    first, so that the source's weights can go before the steps: 256 MiB in float32 at 7B)."""
    return [_attention_out(source, x, call) for x in inputs]


@dataclass
class Refinement:
    """What a layer's refinement gives: whether it beat the closed form, the steps it took, and, for
    the weights it leaves, the relative output error on all calibration batches, the batches' inputs
    and the raw outputs on each, which the calibration stream takes over instead of computing them
    again (`LayerwiseRunner.advance`). When it did not beat the closed form, error and outputs are
    None: the caller loads the closed form again and measures that."""

    improved: bool
    steps: int
    inputs: list[torch.Tensor]
    error: float | None = None
    outputs: list | None = None


@torch.no_grad()
def output_error(module: nn.Module, wanted: list[torch.Tensor], inputs: list[torch.Tensor], call: dict,
                 scale: torch.Tensor) -> tuple[float, list]:
    """The relative output error of `module` on all batches, and its raw outputs."""
    outputs = [module(hidden_states=x, **call) for x in inputs]
    err = sum((_first(o) - w).pow(2).mean() for o, w in zip(outputs, wanted)) / len(inputs) / scale
    return float(err), outputs


def output_scale(wanted: list[torch.Tensor]) -> torch.Tensor:
    return sum(w.pow(2).mean() for w in wanted) / len(wanted)


# The "never worse than the closed form" check measures the closed form on every GUARD_STRIDE-th batch
# only (a full pass is ~6% of a SmolLM2 layer's refinement); the fit is compared on the same batches.
GUARD_STRIDE = 4


def refine_attention(
    target: nn.Module, wanted: list[torch.Tensor], inputs: list[torch.Tensor], call: dict,
    steps: int | TimeBudget, lr: float, batch_tokens: int = REFINE_TOKENS, progress: bool = False,
    frozen: tuple[str, ...] = (), dtype: torch.dtype | None = None, spent: float = 0.0,
) -> Refinement:
    """Adam on the relative output error of `target` (trainable, called with `call`) against the
    source's outputs `wanted` (`source_outputs`) on the same inputs.

    The fitted weights are rounded to `dtype` (what the checkpoint will hold) before the final
    error pass, so its error and outputs are the written layer's. When the fit is no better than the
    closed form (e.g. an exact one) the result says so: the target's weights are not copied
    beforehand, for memory, and the caller loads the closed form again.
    Parameters whose names start with one of `frozen` keep their values. With a `TimeBudget` the
    step count is set from the first steps' pace (`spent`: the seconds this layer's refinement
    took before this call) and given in the result.
    """
    started = time.perf_counter()
    budget = steps if isinstance(steps, TimeBudget) else None
    steps = budget.most if budget else steps
    scale = output_scale(wanted)
    params = [p for n, p in target.named_parameters() if not n.startswith(frozen)]
    guard = range(0, len(inputs), GUARD_STRIDE)
    with torch.no_grad():
        before = sum((_attention_out(target, inputs[b], call) - wanted[b]).pow(2).mean() for b in guard)
    for p in params:
        p.requires_grad_(True)
    # One Adam per tensor, stepped as soon as backward has its gradient, which is then dropped: the
    # gradients of a whole layer never exist at once (273 MiB in float32 for an MLA layer at 7B). Step
    # sizes are relative to each tensor's scale: biases, norms and projections differ by orders.
    optimisers = [LeanAdam(p, lr * float(p.detach().pow(2).mean().sqrt().clamp(min=1e-3)), REFINE_BETAS) for p in params]
    hooks = [p.register_post_accumulate_grad_hook(opt.step) for p, opt in zip(params, optimisers)]
    gen = torch.Generator().manual_seed(0)
    step, durations = 0, []
    bar = tqdm(total=steps, desc="refine", disable=not progress, leave=False)
    while step < steps:
        step_start = time.perf_counter()
        b = int(torch.randint(len(inputs), (), generator=gen))
        rows = torch.randperm(inputs[b].shape[0], generator=gen)[:max(1, batch_tokens // inputs[b].shape[1])]
        sub = _rows(call, rows, inputs[b].shape[0])
        loss = (_attention_out(target, inputs[b][rows], sub) - wanted[b][rows]).pow(2).mean() / scale
        for opt in optimisers:  # constant, then linearly to 0 over the last REFINE_DECAY of the steps
            opt.rate = min(1.0, (steps - step) / (REFINE_DECAY * steps))
        loss.backward()  # steps every tensor (the hooks)
        step += 1
        bar.update()
        if budget and step > 2:  # the first steps allocate: not timed
            now = time.perf_counter()
            durations.append(now - step_start)
            if len(durations) >= budget.PROBE and step < budget.SETTLED * steps:
                steps = budget.steps(budget.pace(durations), spent + now - started, done=step)
                bar.total = steps
    bar.close()
    for p, hook in zip(params, hooks):
        p.requires_grad_(False)
        hook.remove()
    with torch.no_grad():
        if dtype is not None and dtype != torch.float32:
            for p in params:
                if p.is_floating_point():
                    p.copy_(p.to(dtype))
    err, outputs = output_error(target, wanted, inputs, call, scale)
    after = sum((_first(outputs[b]) - wanted[b]).pow(2).mean() for b in guard)
    if after < before:  # never leave a layer worse than the closed form
        return Refinement(True, step, inputs, err, outputs)
    return Refinement(False, step, inputs)
