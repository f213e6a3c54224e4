"""Newton refinement: further steps on the edited objective after the paper's single update.

Step k from Θ_k: Θ_{k+1} = Θ_k + α·Δ_k, (C_edited(Θ_k) + λI)·m·Δ_k = −n·∇R'(Θ_k), α by Armijo
backtracking on n·R'. The gradient of the kept samples is not recomputed in full: with the
stationarity of Θ̂ (Σ_all ∇L_i(Θ̂)/n + wd·Θ̂ = 0),
    Σ_kept ∇L_i(Θ_k) = −Σ_S ∇L_old(Θ̂) − n·wd·Θ̂ + Σ_kept [∇L_i(Θ_k) − ∇L_i(Θ̂)],
and only the last sum, small near Θ̂, is estimated on the curvature sample (acceptance.control_variate).
"""

from __future__ import annotations

import torch

from .acceptance import backtrack, control_variate, retraining_objective
from .curvature import GAUSS_NEWTON
from .data import EditRequest
from .problem import Problem
from .settings import UnlearnSettings
from .systems import Systems


def gradient_from_operator(settings: UnlearnSettings, m: int) -> bool:
    """Whether a step's operator over the m edited samples holds all of them (a Gauss-Newton curvature over
    every sample), so that its linearisations give the step's gradient too: one backward a batch instead of
    a forward and a backward."""
    return settings.curvature in GAUSS_NEWTON and (not settings.curvature_samples or settings.curvature_samples >= m)


def refine(problem: Problem, request: EditRequest, systems: Systems, settings: UnlearnSettings, theta: torch.Tensor,
           damping: float, progress: bool):
    """(Θ, last solve's result, per-step records) after steps 2 … newton_steps from Θ; stops at the first
    step whose search finds no descent."""
    p, s = problem, settings
    cv = control_variate(p, request, s.curvature_samples, s.seed, "refine", progress)
    sample, scale, new = cv.sample, cv.scale, cv.new
    edited = cv.kept + new
    m = len(edited)

    def objective(t):
        """n·R'(Θ) + const under the same stationarity assumption as the gradient, so the two agree."""
        return retraining_objective(cv.data_part(t), t, 1, p.n * p.weight_decay)

    from_operator = gradient_from_operator(s, m)
    steps, result, value = [], None, None
    for k in range(2, s.newton_steps + 1):
        op = systems.operator(theta, edited, damping)
        if from_operator:
            g_sample_and_new = op.loss_gradient()[0]  # sample = kept here, scale = 1
        else:
            g_sample_and_new = scale * p.grad_sum(sample, theta, "refine: kept sample", progress)
            if new:
                g_sample_and_new += p.grad_sum(new, theta, "refine: new samples", progress)
        # n·∇R'(Θ_k), see the module docstring
        grad = g_sample_and_new - scale * cv.g_sample_hat - cv.g_old_hat + p.n * p.weight_decay * (theta - p.theta_hat)
        result = systems.solve(op, -grad, (), progress, s.refine_iters or None)[0]
        op.release()
        step = result.delta / m  # op is the mean curvature over the m edited samples: x = m·Δ
        # backtracking along the solved direction (docs/design.md#newton-backtracking); f(Θ_k): the last accepted value
        search = backtrack(objective, theta, step, float(grad @ step), start=value)
        steps.append({"step": k, "grad_norm": float(grad.norm()), "iterations": result.iterations,
                      "final_residual": result.final_residual, "converged": result.converged, "line_search": search})
        if not search["accepted"]:
            break
        theta = theta + search["scale"] * step
        value = search["trace"][-1]["objective"]
    return theta, result, steps
