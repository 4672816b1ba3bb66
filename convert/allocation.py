"""Spread a total cache budget over layers: each layer offers (cost, error) choices, and the
allocation takes one per layer so that the costs stay within the budget and the summed error is
smallest (a min-plus knapsack over integer costs, solved exactly by dynamic programming).

The costs are cache elements per token; the errors are each layer's estimated relative error
(for MLA: `convert.mla.latent_rope_errors`), so the layers that lose most for an element they
give up keep it.
"""

from __future__ import annotations

from typing import Generic, Hashable, TypeVar

import numpy as np

from .errors import ConversionError

Choice = TypeVar("Choice", bound=Hashable)


class LayerChoices(Generic[Choice]):
    """The best choice of one layer at each exact cost (lowest error among the choices of that cost)."""

    def __init__(self):
        self.best: dict[int, tuple[float, Choice]] = {}

    def offer(self, cost: int, error: float, choice: Choice) -> None:
        if cost >= 0 and (cost not in self.best or error < self.best[cost][0]):
            self.best[cost] = (float(error), choice)

    @property
    def costs(self) -> list[int]:
        return sorted(self.best)


def allocate(layers: list[LayerChoices], total: int) -> list:
    """One choice per layer with costs summing to at most `total`, minimising the summed error (ties:
    the smaller total). With errors that fall as a layer's cost grows, as a latent's rank, the
    whole `total` is spent unless every layer already has its best shape."""
    if not layers:
        return []
    if any(not layer.best for layer in layers):
        raise ConversionError("A layer has no valid cache shape to allocate.")
    least = sum(min(layer.best) for layer in layers)
    if total < least:
        raise ConversionError(f"The cache budget of {total} elements per token is below the {least} the layers need at "
                              "their smallest.")
    dp = np.zeros(1)  # dp[c]: least summed error of the layers so far at exact total cost c
    picks = []
    for layer in layers:
        new = np.full(min(len(dp) - 1 + max(layer.best), total) + 1, np.inf)
        pick = np.full(new.shape, -1, dtype=np.int64)
        for cost in layer.costs:
            if cost >= len(new):
                break
            span = min(len(dp), len(new) - cost)
            candidate = dp[:span] + layer.best[cost][0]
            better = candidate < new[cost: cost + span]
            new[cost: cost + span][better] = candidate[better]
            pick[cost: cost + span][better] = cost
        dp = new
        picks.append(pick)
    remaining = int(np.argmin(dp))  # the first of equal minima: the smaller total
    chosen = []
    for layer, pick in zip(reversed(layers), reversed(picks)):
        cost = int(pick[remaining])
        chosen.append(layer.best[cost][1])
        remaining -= cost
    return chosen[::-1]
