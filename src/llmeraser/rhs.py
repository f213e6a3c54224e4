"""The right-hand side b = Σ_{z ∈ S} [∇L(z_old) − ∇L(z_new)] at Θ̂ (new term 0 for removal).

b is the *unscaled* sum; the solver finds x = n·ΔΘ and the caller divides by n at the end, so no
solver meets values around 1e-9 (method.md §7.5).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .errors import NumericalError
from .objective import Objective, by_length
from .params import AdapterParams


def sum_of_gradients(objective: Objective, params: AdapterParams, theta_hat: torch.Tensor, items: list,
                     batch_size: int, device="cpu", desc: str = "gradients", progress: bool = True) -> torch.Tensor:
    """Σ_i ∇_Θ L(z_i; Θ̂) over `items`, batched (one backward per batch of per-sample loss sums)."""
    items = by_length(items)
    batches = (objective.collate(items[i:i + batch_size], device) for i in range(0, len(items), batch_size))
    return gradient_sum(objective, params, theta_hat, batches, desc, progress, total=-(-len(items) // batch_size))


def gradient_sum(objective: Objective, params: AdapterParams, theta_hat: torch.Tensor, batches, desc: str = "gradients",
                 progress: bool = True, total: int | None = None) -> torch.Tensor:
    """Σ_i ∇_Θ L(z_i; Θ̂) over already collated (perhaps prepared) batches."""
    out = torch.zeros_like(theta_hat)
    total = len(batches) if total is None else total
    for batch in tqdm(batches, desc=desc, total=total, disable=not progress or total < 2, leave=False):
        with torch.enable_grad():
            theta = theta_hat.detach().clone().requires_grad_(True)
            loss_sum = objective.losses(objective.outputs(params.unflatten(theta), batch), batch).sum()
            (g,) = torch.autograd.grad(loss_sum, theta)
        out += g
    if not torch.isfinite(out).all():
        raise NumericalError(f"{desc}: the gradient is not finite; check the adapter weights and the data")
    return out


def compute_rhs(objective: Objective, params: AdapterParams, theta_hat: torch.Tensor, old_items: list,
                new_items: list, batch_size: int, device="cpu", progress: bool = True) -> torch.Tensor:
    """b = Σ ∇L(old) − Σ ∇L(new). `new_items` holds only the edited (not removed) samples."""
    b = sum_of_gradients(objective, params, theta_hat, old_items, batch_size, device, "b: old samples", progress)
    if new_items:
        b -= sum_of_gradients(objective, params, theta_hat, new_items, batch_size, device, "b: new samples", progress)
    return b
