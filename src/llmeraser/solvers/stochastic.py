from __future__ import annotations

import torch

from .base import SolveResult, Solver, estimate_lambda_max


class Stochastic(Solver):
    """The paper's Algorithm 1: minimise F(x) = ½ xᵀ(C+λI)x − bᵀx with mini-batch HVPs.

    The gradient handed to the optimiser is set to exactly (C_B + λI)x − b, an unbiased estimate
    of ∇F; nothing is backpropagated through ½xᵀCx (the reference code did that through a
    detached HVP and so optimised with ½C). The problem is solved for b̂ = b/‖b‖ so that step
    sizes do not depend on the scale of b, and x is scaled back at the end.

    Optimisers: ``sgd`` with heavy-ball momentum and step 1/L (L from power iteration) by
    default, or ``adam``. Over the second half of the budget the step decays linearly to zero
    and the iterates are averaged (Polyak-Ruppert), so the mini-batch noise averages out; the
    residual is then computed at the average. Stops when the residual on the fixed batches < tol.
    """

    name = "stochastic"
    default_iters = 1000

    def solve(self, op, b, progress=True):
        """Run; if the residual blows past 10·‖b‖ (a step size above 2/λ_max of some batch), halve the step and restart."""
        lr = self.settings.lr
        for attempt in range(4):
            result = self._run(op, b, progress, lr)
            if not result.info.get("diverged"):
                break
            lr = result.info["lr"] / 2
        result.info["restarts"] = attempt
        return result

    def _run(self, op, b, progress, lr):
        s = self.settings
        bnorm = torch.linalg.vector_norm(b)
        bhat = b / bnorm
        x = torch.zeros_like(b, requires_grad=True)
        info = {}
        if s.optimizer == "sgd":
            if lr is None:
                lam_max = estimate_lambda_max(op, s.power_iters)
                info["lambda_max_estimate"] = lam_max
                lr = 1.0 / lam_max
            opt = torch.optim.SGD([x], lr=lr, momentum=s.momentum)
        else:
            lr = lr if lr is not None else 0.01
            opt = torch.optim.Adam([x], lr=lr)
        info.update(optimizer=s.optimizer, lr=lr)
        total = self.max_iters
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, 2.0 * (1 - t / total)))
        residuals, converged = [(0, 1.0)], False
        bar = self._bar(progress, total)
        t, avg, n_avg = 0, torch.zeros_like(bhat), 0
        for t in range(1, total + 1):
            with torch.no_grad():
                g = op(x.detach(), op.sample()) - bhat
            x.grad = g
            opt.step()
            sched.step()
            if t > total // 2:
                n_avg += 1
                avg += (x.detach() - avg) / n_avg
            bar.update(1)
            if t % s.check_every == 0 or t == total:
                rel = op.residual(self._estimate(x, avg, n_avg), bhat)
                residuals.append((t, rel))
                bar.set_postfix(residual=f"{rel:.2e}")
                if rel < s.tol:
                    converged = True
                    break
                if rel > 10:
                    info["diverged"] = True
                    break
        bar.close()
        return SolveResult(self._estimate(x, avg, n_avg) * bnorm, t, residuals, converged, info)

    @staticmethod
    def _estimate(x, avg, n_avg):
        return avg.clone() if n_avg else x.detach().clone()
