"""Accepting a step: the retraining objective, Armijo backtracking along a solved step, and the choice
among the steps of several dampings.

A solved step minimises a quadratic model of the retraining objective around Θ̂. Where the model is
wrong far from Θ̂ (an adapter that memorised its data: near-zero curvature, a corrected answer with a
large gradient), the full step can wreck the adapter, so it is scaled by 1, ½, ¼, … until it lowers
the objective itself by the Armijo rule.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import torch

from .curvature import seeded_subset
from .data import EditRequest
from .problem import Problem

log = logging.getLogger(__name__)


def retraining_objective(data_sum: float, theta: torch.Tensor, count: float, weight_decay: float) -> float:
    """data_sum/count + (wd/2)‖Θ‖²: the retraining objective from the edited set's summed loss.

    count = m gives R'(Θ) = (1/m)Σ_edited L + (wd/2)‖Θ‖², the scale of the line search and the damping
    choice; count = 1 with wd·n gives the summed form the Newton refinement uses, whose gradient is the
    n·∇ its solve takes."""
    return data_sum / count + 0.5 * weight_decay * float(theta.square().sum())


class Objective:
    """f(Θ) for a line search, with `start` = f(`at`) where it is known without a pass."""

    def __init__(self, f, at: torch.Tensor | None = None):
        self.f, self.start, self.at = f, None, at

    def __call__(self, theta, **kw):
        return self.f(theta, **kw)


def backtrack(objective, theta: torch.Tensor, step: torch.Tensor, slope: float, max_halvings: int = 10,
              start: float | None = None, guard=None) -> dict:
    """Armijo backtracking: the first α in 1, 1/2, … with f(Θ + αΔ) <= f(Θ) + 1e-4·α·slope.

    `start`, when known, is f(Θ) (else `objective.start` where the objective knows its value at this very Θ).
    `guard(Θ')` -> (ok, count), asked only where Armijo holds: an α it refuses is halved too (settings
    line_search_kept: no scale at which the kept answers turn uncertain); its count goes into the trace.
    Without such an α it reports the best α tried (with a guard: the smallest, the one nearest Θ) and
    accepted = False (the caller decides)."""
    if start is None and getattr(objective, "at", None) is theta:
        start = objective.start
    start = objective(theta) if start is None else start
    trace, alpha = [], 1.0
    # a step whose slope is ≥ 0 (curvature_data 'original' solves without the removed records' weight decay, which
    # the searched objective has) may still lower f further out, but must never raise it: Armijo with slope 0
    armijo = min(slope, 0.0)
    for _ in range(max_halvings + 1):
        value = objective(theta + alpha * step)
        trace.append({"scale": alpha, "objective": value})
        if value == value and value <= start + 1e-4 * alpha * armijo:
            ok = True
            if guard is not None:
                ok, trace[-1]["kept_uncertain"] = guard(theta + alpha * step)
            if ok:
                return {"scale": alpha, "accepted": True, "start": start, "slope": slope, "trace": trace}
        alpha /= 2
    if guard is not None:
        best = trace[-1]
    else:
        best = min(trace, key=lambda t: t["objective"] if t["objective"] == t["objective"] else float("inf"))
    return {"scale": best["scale"], "accepted": False, "start": start, "slope": slope, "trace": trace}


def guard_note(search: dict) -> str:
    """The words a message about a search that found no scale adds when a guard refused some of them."""
    return " and kept the kept answers (line_search_kept)" if any("kept_uncertain" in t for t in search["trace"]) else ""


def control_variate(problem: Problem, request: EditRequest, size: int, seed: int, desc: str, progress: bool) -> SimpleNamespace:
    """Σ_kept L_i(Θ) + Σ_new L(Θ), up to a constant, from a seeded sample of `size` kept records:
        data_part(Θ) = s·Σ_sample [L_i(Θ) − L_i(Θ̂)] + (g_kept − s·g_sample)·(Θ − Θ̂) + Σ_new L(Θ),
    s = |kept|/|sample|, g_kept = −Σ_S ∇L_old(Θ̂) − n·wd·Θ̂ by the stationarity of Θ̂
    (Σ_all ∇L_i(Θ̂)/n + wd·Θ̂ = 0), so that its slope at Θ̂ is the one b gives. Shared by the line search
    and the Newton refinement."""
    p, sets = problem, problem.sets(request)
    sample = seeded_subset(sets.kept, size, seed)
    scale = len(sets.kept) / len(sample) if sample else 0.0  # no kept record: every one edited
    g_old_hat = p.old_grad(request, progress)
    sample_batches, new_batches = p.batches(sample), p.batches(sets.new)
    g_sample_hat = p.grad_sum_of_batches(sample_batches, p.theta_hat, f"{desc}: kept sample at Θ̂", progress)
    linear = -g_old_hat - p.n * p.weight_decay * p.theta_hat - scale * g_sample_hat
    base = p.loss_sum(sample_batches, p.theta_hat)

    def data_part(t, sample=True):
        """`sample=False` at Θ̂ only, where the sample's term is exactly 0 (the same passes as `base`)."""
        val = scale * (p.loss_sum(sample_batches, t) - base) + float(linear @ (t - p.theta_hat)) if sample else 0.0
        return val + (p.loss_sum(new_batches, t) if sets.new else 0.0)

    return SimpleNamespace(kept=sets.kept, new=sets.new, sample=sample, scale=scale, g_old_hat=g_old_hat, g_sample_hat=g_sample_hat,
                           data_part=data_part)


def line_objective(problem: Problem, request: EditRequest, sample_size: int, seed: int,
                   penalty=None) -> tuple[Objective, bool]:
    """(f, exact): f(Θ) = R'(Θ) up to a constant, and whether it is R' itself; `penalty(Θ)` is added.

    When every kept sample fits in `sample_size` (0: all), f is R' over the edited set. Otherwise the kept
    samples' part is the control variate, whose slope at Θ̂ is the one the solve used; the sample's own
    slope differs, and a search on it can reject a converged step at every scale
    (docs/design.md#line-search-control-variate)."""
    p, sets = problem, problem.sets(request)
    if not sample_size or sample_size >= len(sets.kept):
        items = sets.edited
        batches = p.batches(items)
        f = Objective(lambda t: retraining_objective(p.loss_sum(batches, t), t, len(items), p.weight_decay))
        exact = True
    else:
        cv = control_variate(p, request, sample_size, seed, "line search", False)
        m = len(sets.kept) + len(sets.new)
        f = Objective(lambda t, **kw: retraining_objective(cv.data_part(t, **kw), t, m, p.weight_decay), at=p.theta_hat)
        # at Θ̂ the sample's part is 0 by construction: R'(Θ̂) needs only the new samples' losses
        f.start = f(p.theta_hat, sample=False)
        exact = False
    if penalty is None:
        return f, exact
    g = Objective(lambda t: f(t) + penalty(t), at=f.at)
    if f.start is not None:
        g.start = f.start + penalty(p.theta_hat)
    return g, exact


def choose_step(objective, theta_hat: torch.Tensor, steps: list[torch.Tensor], neg_grad: torch.Tensor,
                line_search: bool, guard=None) -> tuple[int, list[dict]]:
    """(index, searches): of the steps solved for several λ (smallest λ first), the one whose line-searched
    step lowers `objective` most. A λ whose search finds no descent is chosen only when none does; a tie
    goes to the larger λ. Without `line_search` only each full step is scored. `guard`: as backtrack's."""
    start, rows = None, []
    for i, step in enumerate(steps):
        search = backtrack(objective, theta_hat, step, -float(neg_grad @ step), 10 if line_search else 0, start=start,
                           guard=guard)
        start = search["start"]
        # the objective at the scale the search settled on (min() over the trace would return a NaN of a wild full step)
        value = next(t["objective"] for t in search["trace"] if t["scale"] == search["scale"])
        rows.append((i, search, value))
    accepted = [r for r in rows if r[1]["accepted"]] or rows[-1:]
    best = min(reversed(accepted), key=lambda r: r[2])  # reversed: a tie goes to the larger λ
    return best[0], [{"search": r[1], "objective": r[2]} for r in rows]
