from __future__ import annotations

import torch

from .base import SolveResult, Solver, estimate_lambda_max


class LiSSA(Solver):
    """LiSSA (Agarwal et al. 2017), the stochastic Neumann series used by Koh & Liang:

        y_0 = b̂,   y_{j+1} = b̂ + (I − (C_B + λI)/s) y_j,   x = y / s

    with a fresh mini-batch B each step. It converges when s > λ_max(C + λI); the default s is
    1.5 × a power-iteration estimate. Kept for comparison with the stochastic solver.
    """

    name = "lissa"
    default_iters = 1000

    def solve(self, op, b, progress=True):
        s = self.settings
        bnorm = torch.linalg.vector_norm(b)
        bhat = b / bnorm
        info = {}
        scale = s.lissa_scale
        if scale is None:
            scale = 1.5 * estimate_lambda_max(op, s.power_iters)
        info["scale"] = scale
        y = bhat.clone()
        residuals, converged = [(0, 1.0)], False
        bar = self._bar(progress, self.max_iters)
        j = 0
        for j in range(1, self.max_iters + 1):
            y = bhat + y - op(y, op.sample()) / scale
            bar.update(1)
            if j % s.check_every == 0 or j == self.max_iters:
                rel = op.residual(y / scale, bhat)
                residuals.append((j, rel))
                bar.set_postfix(residual=f"{rel:.2e}")
                if rel < s.tol:
                    converged = True
                    break
                if rel > 1e6:
                    info["diverged"] = True
                    break
        bar.close()
        return SolveResult(y / scale * bnorm, j, residuals, converged, info)
