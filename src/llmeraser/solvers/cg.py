from __future__ import annotations

import torch

from .base import SolveResult, Solver


# a shifted system whose residual is this many times the seed's is solved far below any tolerance; it is
# left alone from then on, because its ζ keeps shrinking geometrically and would underflow to 0
TINY = 1e-100


class ConjugateGradient(Solver):
    """Conjugate gradients on (C + λI) x = b, C over the operator's fixed training batches.

    Each iteration costs one pass of HVPs over those batches. CG needs a positive-definite
    operator: if it meets pᵀ(C+λI)p ≤ 0 (negative curvature, possible with the true Hessian
    at a real adapter) it stops there, reports it (info["negative_curvature_at"]) and returns its
    last iterate, or b at the first iteration: a descent direction for the caller's line search
    (docs/design.md#newton-backtracking). Convergence is claimed on the measured residual, not
    the recursive one alone.
    """

    name = "cg"
    default_iters = 50

    def solve(self, op, b, progress=True):
        return self.solve_shifted(op, b, (), progress)[0]

    def solve_shifted(self, op, b, shifts, progress=True) -> list[SolveResult]:
        """x_σ = (C + λI + σI)⁻¹ b for σ = 0 and every σ in `shifts` (each > 0), in one run.

        Multi-shift CG (Jegerlehner 1996, hep-lat/9612014): the Krylov space of b under C + λI is the
        same for every shift, so the shifted systems reuse the seed system's products and cost only
        vector updates. Their residuals are ζ_σ times the seed's, with |ζ_σ| <= 1, so they converge no
        later than the seed (the least damped, hardest system); the run stops on the seed's residual.
        Returns one SolveResult per shift, the seed's (σ = 0) first.
        """
        shifts = [float(s) for s in shifts]
        if any(not s > 0 for s in shifts):
            raise ValueError("shifts must be > 0")
        bnorm = torch.linalg.vector_norm(b)
        x = torch.zeros_like(b)
        r = b.clone()
        p = r.clone()
        rs = torch.dot(r, r)
        xs = [torch.zeros_like(b) for _ in shifts]
        ps = [b.clone() for _ in shifts]
        zeta, zeta_old = [1.0] * len(shifts), [1.0] * len(shifts)
        frozen = [False] * len(shifts)
        alpha_old, beta_old = 1.0, 0.0
        residuals = [[(0, 1.0)] for _ in range(len(shifts) + 1)]
        converged, info = False, {}
        # per shift: its own negative curvature (met at iteration 1 only: after that the seed's stops the run first)
        shift_info = [{} for _ in shifts]
        restarted = False  # after a restart the shifted systems stay at iterates whose residuals were never measured
        solved_early = [False] * len(shifts)
        bar = self._bar(progress, self.max_iters)
        k = 0
        for k in range(1, self.max_iters + 1):
            ap = op.full(p)
            pap = torch.dot(p, ap)
            if pap <= 0:
                info["negative_curvature_at"] = k
                if k == 1:
                    # no CG iterate yet: return b, the steepest descent of q(x) = ½xᵀAx − bᵀx at x = 0, as Newton-CG
                    # does (Nocedal & Wright, Alg. 7.1), so that the caller's line search has a descent direction to
                    # scale rather than a zero step it would accept as a no-op. A shifted system whose curvature
                    # along b is positive, bᵀAb + σ‖b‖² > 0, gets its own first CG iterate instead
                    x = b.clone()
                    info["steepest_descent"] = True
                    for j, s in enumerate(shifts):
                        own = pap + s * rs
                        xs[j] = b * float(rs / own) if own > 0 else b.clone()
                        shift_info[j] = {"negative_curvature_at": 1, "steepest_descent": True} if own <= 0 else {}
                k -= 1
                break
            alpha = float(rs / pap)
            for j, s in enumerate(shifts):
                if abs(zeta[j]) < TINY:  # solved to far below any tolerance; ζ would underflow to 0 next
                    frozen[j] = solved_early[j] = True
                if frozen[j]:
                    continue
                denom = alpha * beta_old * (zeta_old[j] - zeta[j]) + zeta_old[j] * alpha_old * (1.0 + s * alpha)
                zeta_new = zeta[j] * zeta_old[j] * alpha_old / denom
                xs[j] += (alpha * zeta_new / zeta[j]) * ps[j]
                zeta_old[j], zeta[j] = zeta[j], zeta_new
            x += alpha * p
            r -= alpha * ap
            rs_new = torch.dot(r, r)
            beta = float(rs_new / rs)
            rel = float(torch.sqrt(rs_new) / bnorm)
            residuals[0].append((k, rel))
            for j in range(len(shifts)):
                if frozen[j]:  # its x and residual stay
                    continue
                residuals[j + 1].append((k, abs(zeta[j]) * rel))
                # p_σ = ζ_σ r + β (ζ_σ/ζ_σ,old)² p_σ, with ζ already advanced
                ps[j] = zeta[j] * r + (beta * (zeta[j] / zeta_old[j]) ** 2) * ps[j]
            bar.update(1)
            bar.set_postfix(residual=f"{rel:.2e}")
            if rel < self.settings.tol:
                # r is the recursive residual, b − Ax only in exact arithmetic: confirm with one more product (on the
                # seed only) before claiming convergence, and report the measured value as the last one
                r_true = b - op.full(x)
                true_rel = float(torch.linalg.vector_norm(r_true) / bnorm)
                residuals[0][-1] = (k, true_rel)
                info["recursive_residual"] = rel
                if true_rel < self.settings.tol:
                    converged = True
                    break
                # they drifted apart: restart CG from the true residual (a valid restart: x is kept, p = r). The
                # shifted systems' ζ recurrence assumes one unbroken Krylov run, so they stay at their iterates.
                info["restarts"] = info.get("restarts", 0) + 1
                frozen, restarted = [True] * len(shifts), True
                r, rs_new, beta = r_true, torch.dot(r_true, r_true), 0.0
            p = r + beta * p
            rs = rs_new
            alpha_old, beta_old = alpha, beta
        bar.close()
        out = [SolveResult(x, k, residuals[0], converged, info)]
        seed_only = ("negative_curvature_at", "steepest_descent", "recursive_residual")
        for j, s in enumerate(shifts):
            res = residuals[j + 1]
            ok = res[-1][1] < self.settings.tol and (solved_early[j] or not restarted)
            shared = {key: v for key, v in info.items() if key not in seed_only}
            if "negative_curvature_at" in info and not shift_info[j]:
                shared["seed_negative_curvature_at"] = info["negative_curvature_at"]  # it stopped the run, not this one
            out.append(SolveResult(xs[j], k, res, ok, {**shared, **shift_info[j], "shift": s}))
        return out
