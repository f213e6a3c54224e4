"""Newton refinement: further steps on the edited objective after the paper's single update.

Step k from Θ_k: Θ_{k+1} = Θ_k + α·Δ_k, (C_edited(Θ_k) + (λ + wd)I)·m·Δ_k = −m·∇R'(Θ_k), α by Armijo
backtracking on m·R', R'(Θ) = (1/m)Σ_edited L_i + (wd/2)‖Θ‖² (the retraining objective, as the first step's),
so m·∇R'(Θ_k) = Σ_edited ∇L_i(Θ_k) + m·wd·Θ_k. The gradient of the kept samples is not recomputed in full:
with the stationarity of Θ̂ (Σ_all ∇L_i(Θ̂)/n + wd·Θ̂ = 0),
    Σ_kept ∇L_i(Θ_k) = −Σ_S ∇L_old(Θ̂) − n·wd·Θ̂ + Σ_kept [∇L_i(Θ_k) − ∇L_i(Θ̂)],
and only the last sum, small near Θ̂, is estimated on the curvature sample (acceptance.control_variate).
"""

from __future__ import annotations

import torch

from .acceptance import backtrack, control_variate, retraining_objective
from .curvature import GAUSS_NEWTON
from .data import EditRequest
from .problem import Problem
from .reset import OutputReset
from .settings import UnlearnSettings
from .support import capped_by_sample
from .systems import Systems


def gradient_from_operator(settings: UnlearnSettings, m: int) -> bool:
    """Whether a step's operator over the m edited samples holds all of them (a Gauss-Newton curvature over
    every sample), so that its linearisations give the step's gradient too: one backward a batch instead of
    a forward and a backward."""
    return settings.curvature in GAUSS_NEWTON and (not settings.curvature_samples or settings.curvature_samples >= m)


class Refiner:
    """Newton steps 2, 3, … from a given Θ, one per `step()`; the control variate is built once, so a caller
    may take more steps later (`unlearn --verify until`) at the cost of the steps alone."""

    def __init__(self, problem: Problem, request: EditRequest, systems: Systems, settings: UnlearnSettings,
                 damping: float, progress: bool, guard=None):
        self.p, self.s, self.systems, self.damping, self.progress = problem, settings, systems, damping, progress
        self.guard = guard  # None, or Θ_k -> the line search's guard from Θ_k (Unlearner.kept_guard)
        self.cv = control_variate(problem, request, settings.curvature_samples, settings.seed, "refine", progress)
        self.edited = self.cv.kept + self.cv.new
        self.from_operator = gradient_from_operator(settings, len(self.edited))
        self.value = None  # m·R' (+ const) at the current Θ, once a step without a penalty has been accepted
        self.k = 1  # the number of the last step taken
        self._reset = (None, None)  # (removed ids, OutputReset) of the last step that pulled some toward the base
        # reset_target 'capped': {id(removed sample): {token it pulls: the kept continuations there}} (support.py)
        self.capped = (capped_by_sample(problem, request, settings.capped_chars, settings.capped_words)
                       if settings.reset_target == "capped" else None)

    def objective(self, t: torch.Tensor) -> float:
        """m·R'(Θ) + const (data_part: Σ_edited L + const) under the same stationarity assumption as the gradient,
        so the two agree."""
        return retraining_objective(self.cv.data_part(t), t, 1, len(self.edited) * self.p.weight_decay)

    def reset_term(self, removed: list, parts: dict | None = None):
        """ρ·P over these removed samples (reset.py; `parts`: its private-parts-only targets; capped targets under
        reset_target 'capped'), kept while the same
        ones are asked for (its targets; step() releases its kept products after each solve)."""
        key = (tuple(id(x) for x in removed), tuple(sorted((k, tuple(v)) for k, v in (parts or {}).items())))
        if self._reset[0] != key:
            if self._reset[1] is not None:
                self._reset[1].release()
            p = self.p
            self._reset = (key, OutputReset(p.objective, p.params, p.theta_hat, removed, self.s.batch_size, p.device,
                                            memory=p.memory, parts=parts, capped=self.capped, cap=self.s.repair_threshold,
                                            own=self.s.capped_own))
        return self._reset[1]

    def step(self, theta: torch.Tensor, reset_removed: list | None = None, teach_new: list | None = None,
             restore_kept: list | None = None, reset_parts: dict | None = None):
        """(Θ after the step, the solve's result, the step's record); Θ is unchanged when its search finds
        no descent (record["line_search"]["accepted"] is False).

        `reset_removed`: removed samples whose answers are still produced; with the setting reset_removed = ρ > 0
        the step minimises m·R' + ρ·P over them (P of reset.py, its Gauss-Newton curvature taken at Θ̂), the
        penalty the first step used; `reset_parts` ({id(sample): token indices}) pulls only those tokens of a
        sample and holds its others at Θ̂'s outputs (reset.py). `teach_new`: new versions (corrections, modified
        queries) whose answers are not produced yet; with ρ_T > 0 (verify_pull, else ρ) the step adds ρ_T·Σ_T L_i,
        the same pull toward what retraining fits to near-zero loss, with its curvature at Θ_k
        (docs/design.md#verification). `restore_kept`: kept samples whose answers the edit made uncertain, added to
        the same ρ_T·Σ_T L_i: retraining fits them as it fits the new answers."""
        p, s, cv, m = self.p, self.s, self.cv, len(self.edited)
        taught = list(teach_new or ()) + list(restore_kept or ())
        self.k += 1
        reset = self.reset_term(reset_removed, reset_parts) if reset_removed and s.reset_removed else None
        rho, rho_t = s.reset_removed, s.verify_pull or s.reset_removed
        terms = ((rho / m, reset.product),) if reset is not None else ()
        teach = None
        if taught and rho_t:
            # (C_T + 0·I) v is the mean over T: Σ_T G_i v = |T| times it
            teach = (p.batches(taught), self.systems.operator(theta, taught, 0.0), len(taught))
            terms += ((rho_t * teach[2] / m, teach[1].full),)
        op = self.systems.operator(theta, self.edited, self.damping, terms)
        if self.from_operator:
            g_sample_and_new = op.loss_gradient()[0]  # sample = kept here, scale = 1
        else:
            g_sample_and_new = cv.scale * p.grad_sum(cv.sample, theta, "refine: kept sample", self.progress)
            if cv.new:
                g_sample_and_new += p.grad_sum(cv.new, theta, "refine: new samples", self.progress)
        # m·∇R'(Θ_k) = Σ_edited ∇L_i(Θ_k) + m·wd·Θ_k, the kept part by stationarity (module docstring)
        grad = (g_sample_and_new - cv.scale * cv.g_sample_hat - cv.g_old_hat
                + p.weight_decay * (m * theta - p.n * p.theta_hat))
        objective, start = self.objective, self.value
        if reset is not None:
            grad = grad + rho * reset.grad(theta)
            objective, start = (lambda t: self.objective(t) + rho * reset.value(t)), None
        if teach is not None:
            grad = grad + rho_t * p.grad_sum_of_batches(teach[0], theta, "verify: answers not produced", self.progress)
            pulled = objective
            objective, start = (lambda t: pulled(t) + rho_t * p.loss_sum(teach[0], t)), None
        result = self.systems.solve(op, -grad, (), self.progress, s.refine_iters or None)[0]
        op.release()
        if teach is not None:
            teach[1].release()
        if reset is not None:
            # its kept products live for this solve only: they hold autograd graphs over the base weights, which
            # generation between steps (modeling.merged_adapter) rewrites in place, failing a later backward
            reset.release()
        step = result.delta / m  # op is the mean curvature over the m edited samples: x = m·Δ
        # backtracking along the solved direction (docs/design.md#newton-backtracking); f(Θ_k): the last accepted value
        search = backtrack(objective, theta, step, float(grad @ step), start=start,
                           guard=self.guard(theta) if self.guard else None)
        record = {"step": self.k, "grad_norm": float(grad.norm()), **result.step_record(), "line_search": search}
        if reset is not None:
            record["reset_removed"] = len(reset_removed)
            if reset_parts:
                record["reset_parts_only"] = len(reset_parts)
        if teach is not None:
            record["pulled_new"], record["pull_weight"] = len(teach_new or ()), rho_t
            if restore_kept:
                record["restored_kept"] = len(restore_kept)
        if search["accepted"]:
            theta = theta + search["scale"] * step
            # m·R' alone at the new Θ is known only when no penalty (reset or teaching) was added
            self.value = search["trace"][-1]["objective"] if reset is None and teach is None else None
        return theta, result, record

    def release(self) -> None:
        if self._reset[1] is not None:
            self._reset[1].release()
        self._reset = (None, None)


def refine(problem: Problem, request: EditRequest, systems: Systems, settings: UnlearnSettings, theta: torch.Tensor,
           damping: float, progress: bool, guard=None):
    """(Θ, last solve's result, per-step records, the Refiner) after steps 2 … newton_steps from Θ; stops at the
    first step whose search finds no descent."""
    refiner = Refiner(problem, request, systems, settings, damping, progress, guard)
    steps, result = [], None
    for _ in range(2, settings.newton_steps + 1):
        theta, result, record = refiner.step(theta)
        steps.append(record)
        if not record["line_search"]["accepted"]:
            break
    return theta, result, steps, refiner
