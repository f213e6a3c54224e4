"""Objective terms beyond the paper's: penalties added to the edited objective for adapters that
memorised their records, given to the curvature operator and the line search through one protocol.

A term is c·P(Θ) on the summed edited objective: its value and gradient enter the line search and the
right-hand side, its Gauss-Newton curvature c·Jᵀ F J every curvature product. Both in use are
`reset.OutputReset` penalties:

* reset_removed (ρ): P = the removed records' distance to the base model's outputs (reset.py), or with
  reset_target 'capped' to the adapter's own mixed with the kept records' continuations, their unpredicted
  tokens capped (support.py);
* anchor_kept (κ): P = the kept records' distance from their outputs at Θ̂, over the curvature sample,
  scaled by |kept|/|sample|. Zero and flat at Θ̂ (`flat`), it adds curvature only.
"""

from __future__ import annotations

from dataclasses import dataclass

from .curvature import seeded_subset
from .data import EditRequest
from .problem import Problem
from .reset import OutputReset
from .settings import UnlearnSettings
from .support import capped_by_sample


@dataclass
class Term:
    name: str
    coefficient: float  # c in c·P(Θ), on the summed objective
    penalty: OutputReset  # value(Θ), grad(Θ), product(v) at Θ̂, release()
    flat: bool  # ∇P(Θ̂) = 0 exactly: nothing to add to the right-hand side

    def curvature(self, n_eff: int) -> tuple[float, object]:
        """(weight, product) for the operator, which is the curvature of the objective divided by n_eff."""
        return self.coefficient / n_eff, self.penalty.product

    def value(self, theta, n_eff: int) -> float:
        return self.coefficient / n_eff * self.penalty.value(theta)


def extension_terms(problem: Problem, request: EditRequest, settings: UnlearnSettings) -> list[Term]:
    """The terms `settings` asks for. The reset covers removals only: a corrected record's old answer pulled
    toward the base holds its new answer back at the same positions, and a modified query keeps its answer."""
    p, sets, terms = problem, problem.sets(request), []
    if settings.reset_removed and sets.removed:
        capped = (capped_by_sample(p, request, settings.capped_chars, settings.capped_words)
                  if settings.reset_target == "capped" else None)
        reset = OutputReset(p.objective, p.params, p.theta_hat, sets.removed, settings.batch_size, p.device, memory=p.memory,
                            capped=capped, cap=settings.repair_threshold, own=settings.capped_own)
        terms.append(Term("reset_removed", settings.reset_removed, reset, flat=False))
    if settings.anchor_kept and sets.kept:
        sample = seeded_subset(sets.kept, settings.curvature_samples, settings.seed)
        anchor = OutputReset(p.objective, p.params, p.theta_hat, sample, settings.batch_size, p.device, anchor=True,
                             memory=p.memory)
        terms.append(Term("anchor_kept", settings.anchor_kept * (len(sets.kept) / len(sample)), anchor, flat=True))
    return terms
