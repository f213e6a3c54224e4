"""Sums of per-sample gradients Σ_i ∇_Θ L(z_i; Θ), the pieces of b (problem.Problem.rhs) and of the
Newton refinement's gradient. Sums, not means: callers divide by a count they know.

With several processes each rank passes over its share of the samples and the sums are all-reduced, so
every rank returns Σ over all of them (distributed.py)."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from . import distributed
from .errors import NumericalError
from .objective import Objective, by_length
from .params import AdapterParams


def sum_of_gradients(objective: Objective, params: AdapterParams, theta_hat: torch.Tensor, items: list,
                     batch_size: int, device="cpu", desc: str = "gradients", progress: bool = True) -> torch.Tensor:
    """Σ_i ∇_Θ L(z_i; Θ̂) over `items`, batched (one backward per batch of per-sample loss sums)."""
    items = distributed.shard(by_length(items))
    batches = (objective.collate(items[i:i + batch_size], device) for i in range(0, len(items), batch_size))
    return gradient_sum(objective, params, theta_hat, batches, desc, progress, total=-(-len(items) // batch_size))


def gradient_sum(objective: Objective, params: AdapterParams, theta_hat: torch.Tensor, batches, desc: str = "gradients",
                 progress: bool = True, total: int | None = None) -> torch.Tensor:
    """Σ_i ∇_Θ L(z_i; Θ̂) over already collated (perhaps prepared) batches: this rank's share, summed over ranks."""
    out = torch.zeros_like(theta_hat)
    total = len(batches) if total is None else total
    for batch in tqdm(batches, desc=desc, total=total, disable=not progress or total < 2, leave=False):
        with torch.enable_grad():
            theta = theta_hat.detach().clone().requires_grad_(True)
            loss_sum = objective.losses(objective.outputs(params.unflatten(theta), batch), batch).sum()
            (g,) = torch.autograd.grad(loss_sum, theta)
        out += g
    distributed.all_sum(out)
    if not torch.isfinite(out).all():
        raise NumericalError(f"{desc}: the gradient is not finite; check the adapter weights and the data")
    return out
