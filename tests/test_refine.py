"""Layer-local refinement: the least-squares output projection and the never-worse guard."""

from __future__ import annotations

import torch
from torch import nn

from kvslim.convert.refine import fit_output_projection, refine_attention


class Toy(nn.Module):
    """Attention-shaped: a nonlinear part, then an output projection (or something after it)."""

    def __init__(self, seed: int, after: float | None = None, bias: bool = True):
        super().__init__()
        torch.manual_seed(seed)
        self.inner, self.o_proj, self.after = nn.Linear(16, 24), nn.Linear(24, 16, bias=bias), after

    def forward(self, hidden_states):
        out = self.o_proj(torch.tanh(self.inner(hidden_states)))
        return out if self.after is None else out * self.after


def _data(n=4):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(3, 20, 16, generator=g) for _ in range(n)]


def test_output_projection_is_solved_exactly_by_least_squares():
    source, inputs = Toy(0), _data()
    for bias in (True, False):
        target = Toy(1, bias=bias)
        wanted = [source(hidden_states=x).detach() for x in inputs]
        assert fit_output_projection(target, "o_proj", inputs, wanted, {})
        a = torch.cat([torch.tanh(target.inner(x)).reshape(-1, 24) for x in inputs]).detach().double()
        if bias:
            a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], dim=1)
        y = torch.cat([w.reshape(-1, 16) for w in wanted]).double()
        best = torch.linalg.lstsq(a, y).solution
        got = target.o_proj.weight.detach().double().T
        if bias:
            got = torch.cat([got, target.o_proj.bias.detach().double()[None]])
        assert (a @ got - y).pow(2).mean() <= (a @ best - y).pow(2).mean() * (1 + 1e-5)


def test_output_projection_is_left_alone_when_it_is_not_the_modules_output():
    source, inputs, target = Toy(0), _data(), Toy(1, after=2.0)
    before = target.o_proj.weight.detach().clone()
    wanted = [source(hidden_states=x).detach() for x in inputs]
    assert not fit_output_projection(target, "o_proj", inputs, wanted, {})
    assert torch.equal(target.o_proj.weight, before)


def test_refinement_with_the_solved_projection_fits_better_than_adam_alone():
    source, inputs = Toy(0), _data()
    errors = {}
    for projection in (None, "o_proj"):
        target = Toy(1)
        errors[projection] = refine_attention(target, source, inputs, {}, steps=20, lr=1e-2,
                                              output_projection=projection)
    assert errors["o_proj"] < 0.9 * errors[None], errors
