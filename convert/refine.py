"""Layer-local refinement: fit a converted attention layer to the source layer's outputs.

The closed-form merge is optimal for a proxy (key/value reconstruction). What the model needs is
the attention *output*: softmax ignores score shifts, and a key error only matters where it
changes which tokens a query attends to. Starting from the closed form, this fits the converted
layer's projections so that its attention output matches the source layer's on the same
calibration inputs. Only this layer's attention weights move; there is no LM loss and no
end-to-end training, and the result is still a plain checkpoint of the target shape.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm


def _attention_out(module: nn.Module, x: torch.Tensor, call: dict) -> torch.Tensor:
    out = module(hidden_states=x, **call)
    return out[0] if isinstance(out, tuple) else out


def _rows(call: dict, rows: torch.Tensor, batch: int) -> dict:
    """Select the same sequences from batched arguments (e.g. a per-sequence mask)."""
    def pick(v):
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch > 1:
            return v[rows]
        if isinstance(v, tuple):
            return tuple(pick(x) for x in v)
        return v
    return {k: pick(v) for k, v in call.items()}


# The shipped defaults (measured, see convert.pipeline.default_refine_steps).
REFINE_STEPS = 300
REFINE_LR = 3e-2
# Tokens per step whatever the window length (4 windows of 512): short windows would otherwise give
# noisy steps (4 windows of 32 tokens) and a refinement that does not generalise.
REFINE_TOKENS = 2048


def fit_output_projection(target: nn.Module, name: str, inputs: list[torch.Tensor], wanted: list[torch.Tensor],
                          call: dict) -> bool:
    """Solve `target`'s output projection `name` (an nn.Linear whose output is the module's output)
    by least squares on all calibration tokens: with everything before it fixed, the output error
    is linear in its weights, so this is its exact optimum. Returns False (and changes nothing)
    where the module's output is not that projection's."""
    proj = target.get_submodule(name)
    if not isinstance(proj, nn.Linear):
        return False
    seen = []
    handle = proj.register_forward_hook(lambda _m, args, out: seen.append((args[0].detach(), out.detach())))
    try:
        gram = cross = None
        with torch.no_grad():
            for x, w in zip(inputs, wanted):
                seen.clear()
                out = _attention_out(target, x, call)
                if len(seen) != 1 or not torch.equal(seen[0][1], out):
                    return False
                a = seen[0][0].reshape(-1, proj.in_features).double()
                if proj.bias is not None:
                    a = torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1)
                y = w.reshape(-1, proj.out_features).double()
                gram = a.T @ a if gram is None else gram + a.T @ a
                cross = a.T @ y if cross is None else cross + a.T @ y
    finally:
        handle.remove()
    # A tiny ridge keeps directions the calibration never excites where they were.
    ridge = 1e-6 * gram.diagonal().mean().clamp(min=1e-30)
    current = proj.weight.double().T
    if proj.bias is not None:
        current = torch.cat([current, proj.bias.double()[None]], dim=0)
    solved = torch.linalg.solve(gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype), cross + ridge * current)
    with torch.no_grad():
        proj.weight.copy_(solved[:proj.in_features].T.to(proj.weight.dtype))
        if proj.bias is not None:
            proj.bias.copy_(solved[proj.in_features].to(proj.bias.dtype))
    return True


def refine_attention(
    target: nn.Module, source: nn.Module, inputs: list[torch.Tensor], call: dict,
    steps: int = REFINE_STEPS, lr: float = REFINE_LR, batch_tokens: int = REFINE_TOKENS, progress: bool = False,
    target_call: dict | None = None, frozen: tuple[str, ...] = (), output_projection: str | None = None,
) -> float:
    """Adam on the relative output error of `target` (trainable) against `source` (frozen), then
    the output projection (`output_projection`, a submodule name) by least squares.

    Returns the relative error after fitting, measured on all calibration batches.
    `target_call` replaces `call` for the target when its arguments differ (MLA's own RoPE);
    parameters whose names start with one of `frozen` keep their values.
    """
    tcall = call if target_call is None else target_call
    with torch.no_grad():
        wanted = [_attention_out(source, x, call) for x in inputs]
    scale = sum(w.pow(2).mean() for w in wanted) / len(wanted)
    params = [p for n, p in target.named_parameters() if not n.startswith(frozen)]
    initial = [p.detach().clone() for p in params]
    with torch.no_grad():
        before = sum((_attention_out(target, x, tcall) - w).pow(2).mean() for x, w in zip(inputs, wanted))
    for p in params:
        p.requires_grad_(True)
    # Step sizes relative to each tensor's scale: biases, norms and projections differ by orders.
    groups = [{"params": [p], "lr": lr * float(p.detach().pow(2).mean().sqrt().clamp(min=1e-3))} for p in params]
    opt = torch.optim.Adam(groups)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(0)
    for _ in tqdm(range(steps), desc="refine", disable=not progress, leave=False):
        b = int(torch.randint(len(inputs), (), generator=gen))
        rows = torch.randperm(inputs[b].shape[0], generator=gen)[:max(1, batch_tokens // inputs[b].shape[1])]
        sub = _rows(tcall, rows, inputs[b].shape[0])
        loss = (_attention_out(target, inputs[b][rows], sub) - wanted[b][rows]).pow(2).mean() / scale
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    for p in params:
        p.requires_grad_(False)
    if output_projection and not output_projection.startswith(frozen):
        fit_output_projection(target, output_projection, inputs, wanted, tcall)
    with torch.no_grad():
        err = sum((_attention_out(target, x, tcall) - w).pow(2).mean() for x, w in zip(inputs, wanted))
        if err >= before:  # never leave a layer worse than the closed form (e.g. an exact one)
            for p, p0 in zip(params, initial):
                p.copy_(p0)
            err = before
    return float(err / len(inputs) / scale)
