from __future__ import annotations

import torch

from .base import SolveResult, Solver


class ConjugateGradient(Solver):
    """Conjugate gradients on (C + λI) x = b, C over the operator's fixed training batches.

    Each iteration costs one pass of HVPs over those batches. CG needs a positive-definite
    operator: if it meets pᵀ(C+λI)p ≤ 0 (negative curvature, possible with the true Hessian
    at a real adapter) it stops there and reports it, rather than return a meaningless x.
    """

    name = "cg"
    default_iters = 50

    def solve(self, op, b, progress=True):
        bnorm = torch.linalg.vector_norm(b)
        x = torch.zeros_like(b)
        r = b.clone()
        p = r.clone()
        rs = torch.dot(r, r)
        residuals, converged, info = [(0, 1.0)], False, {}
        bar = self._bar(progress, self.max_iters)
        k = 0
        for k in range(1, self.max_iters + 1):
            ap = op.full(p)
            pap = torch.dot(p, ap)
            if pap <= 0:
                info["negative_curvature_at"] = k
                k -= 1
                break
            alpha = rs / pap
            x += alpha * p
            r -= alpha * ap
            rs_new = torch.dot(r, r)
            rel = float(torch.sqrt(rs_new) / bnorm)
            residuals.append((k, rel))
            bar.update(1)
            bar.set_postfix(residual=f"{rel:.2e}")
            if rel < self.settings.tol:
                converged = True
                break
            p = r + (rs_new / rs) * p
            rs = rs_new
        bar.close()
        return SolveResult(x, k, residuals, converged, info)
