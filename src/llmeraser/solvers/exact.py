from __future__ import annotations

import torch

from ..errors import InputError
from .base import SolveResult, Solver


def dense_operator(op) -> torch.Tensor:
    """The damped operator as a p × p matrix, one column per HVP (tiny models only)."""
    eye = torch.eye(op.dim, dtype=op.curvature.theta_hat.dtype, device=op.curvature.theta_hat.device)
    return torch.stack([op.full(eye[i]) for i in range(op.dim)], dim=1)


class Exact(Solver):
    """Form (C + λI) densely from p HVPs over the fixed batches and call torch.linalg.solve.

    Costs p passes and p² memory, so it is for tiny models and tests; it refuses above
    `exact_max_params`.
    """

    name = "exact"
    default_iters = 1

    def solve(self, op, b, progress=True):
        if op.dim > self.settings.exact_max_params:
            raise InputError(
                f"solver exact forms a dense {op.dim:,} × {op.dim:,} matrix, above the limit of "
                f"{self.settings.exact_max_params:,} parameters; use solver cg or stochastic (the recipes' solvers)"
            )
        a = dense_operator(op)
        a = (a + a.T) / 2  # symmetric up to rounding
        x = torch.linalg.solve(a, b)
        rel = float(torch.linalg.vector_norm(a @ x - b) / torch.linalg.vector_norm(b))
        return SolveResult(x, 1, [(0, 1.0), (1, rel)], rel < self.settings.tol,
                           {"min_eigenvalue": float(torch.linalg.eigvalsh(a)[0])})
