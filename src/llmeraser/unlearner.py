"""The algorithm: request -> b -> damped solve -> accepted step -> (Newton refinement) -> ΔΘ.

    ΔΘ = (1/m) α (C + λI)⁻¹ r,   r = b + (n − m)·wd·Θ̂ − Σ_terms c·∇P(Θ̂),   b = Σ_S [∇L(old) − ∇L(new)]

with C the curvature over the edited set (m samples; 'original': over the n training samples, r = b,
m = n: the paper's update), λ the damping plus the training weight decay, α from backtracking on the
retraining objective. Each stage lives in its own module: problem (Θ̂, samples, b), systems (operator and
solver), terms (extensions for memorised data), acceptance (objective, line search, damping choice) and
newton (refinement). Nothing here touches files or writes to the model.
"""

from __future__ import annotations

import logging
import math
import time

import torch

from . import distributed
from .acceptance import backtrack, choose_step, guard_note, line_objective
from .data import EditRequest, Record
from .errors import InputError
from .newton import Refiner, refine
from .problem import EditSets, Problem
from .reset import past_shared_prefix
from .settings import UnlearnSettings
from .systems import Systems
from .terms import extension_terms
from .verify import CERTAIN_NLL

log = logging.getLogger(__name__)


class Unlearner:
    """LLMEraser for a PEFT model in memory. `delta(request)` gives (ΔΘ, the last solve, per-stage records)."""

    def __init__(self, model, tokenizer, records: list[Record], settings: UnlearnSettings, weight_decay: float = 0.0):
        self.settings = settings
        self.problem = Problem(model, tokenizer, records, settings.template, settings.max_length, settings.batch_size,
                               weight_decay, settings.memory_mb)
        self.systems = Systems(self.problem, settings)
        # the λ (plus the training weight decay) of the last accepted step; later Newton steps use it
        self.damping = settings.dampings[0] + weight_decay
        self.refiner: Refiner | None = None  # the Newton refinement of the last request, to take more steps with
        self._certain = (None, [])  # (the kept ids, those whose answer Θ̂ certainly produces): uncertain_kept
        # (key, Θ, ids) of the last uncertain_kept: an extra step's start is asked twice, by verify_restore and the guard
        self._uncertain_at = (None, None, [])

    @property
    def params(self):
        return self.problem.params

    @property
    def theta_hat(self) -> torch.Tensor:
        return self.problem.theta_hat

    def first_system(self, sets: EditSets, b: torch.Tensor) -> tuple[list, torch.Tensor, int]:
        """(samples C is taken over, right-hand side r, m) with ΔΘ = (C + λI)⁻¹r / m.

        'edited': one Newton step from Θ̂ on R'(Θ) = (1/m)Σ_edited L + (wd/2)‖Θ‖²; with Θ̂ stationary for the
        original objective, −∇R'(Θ̂) = [b + (n − m)·wd·Θ̂]/m. 'original': the paper's (C + λI)⁻¹b / n."""
        p = self.problem
        if not sets.edited:  # either way: the line search and the Newton steps are over the edited set
            raise InputError("the request removes every training sample; there is nothing left to fit")
        if self.settings.curvature_data == "original":
            return p.examples, b, p.n
        m = len(sets.edited)
        return sets.edited, b + (p.n - m) * p.weight_decay * p.theta_hat, m

    def delta(self, request: EditRequest, progress: bool = True) -> tuple[torch.Tensor, object, dict]:
        s, p = self.settings, self.problem
        self.refiner = None
        t0 = time.perf_counter()
        b = p.rhs(request, progress)
        t1 = time.perf_counter()
        sets = p.sets(request)
        items, rhs, m = self.first_system(sets, b)
        # −∇R'(Θ̂) = [b + (n − m_e)·wd·Θ̂]/m_e, m_e = |edited|, the slope of the line search's objective whatever data
        # the curvature is over ('original' solves with b and n, which lack the removed records' weight decay)
        m_e = len(sets.edited)
        neg_grad = (b + (p.n - m_e) * p.weight_decay * p.theta_hat) / m_e
        terms = extension_terms(p, request, s)
        op = self.systems.operator(p.theta_hat, items, s.dampings[0] + p.weight_decay, tuple(t.curvature(m) for t in terms))
        for t in terms:
            if not t.flat:
                pull = t.coefficient * t.penalty.grad(p.theta_hat)
                rhs, neg_grad = rhs - pull, neg_grad - pull / m  # the objective carries (c/m)·P (Term.value)
        penalty = (lambda th: sum(t.value(th, m) for t in terms)) if terms else None
        # op carries the smallest λ; the others are shifts of it, solved in the same run
        results = self.systems.solve(op, rhs, tuple(lam - s.dampings[0] for lam in s.dampings[1:]), progress)
        op.release()
        for t in terms:
            t.penalty.release()
        steps = [r.delta / m for r in results]  # the solve was for m·ΔΘ against an unscaled right-hand side
        choice, search, selection = self.accept(request, results, steps, neg_grad, penalty, bool(torch.any(rhs != 0)))
        result, self.damping = results[choice], s.dampings[choice] + p.weight_decay
        theta = p.theta_hat + (search["scale"] if search else 1.0) * steps[choice]
        records = [{"step": 1, "grad_norm": float(b.norm()), **result.step_record(), "line_search": search}]
        if selection:
            records[0]["damping_selection"] = selection
        if s.newton_steps > 1 and torch.any(rhs != 0):
            # the terms enter the first step only (docs/design.md#reset-first-step-only)
            theta, result, more, self.refiner = refine(p, request, self.systems, s, theta, self.damping, progress,
                                                       self.kept_guard(request))
            records += more
        stage = {"b": t1 - t0, "solve": time.perf_counter() - t1, "rhs_norm": float(b.norm()), "steps": records}
        reset = next((t for t in terms if t.name == "reset_removed"), None)
        if reset is not None:  # evidence: how far the removed records' outputs are from the base model's
            stage["reset_removed"] = {"rho": s.reset_removed, "distance_before": reset.penalty.value(p.theta_hat),
                                      "distance_after": reset.penalty.value(theta)}
            if reset.penalty.capped_tokens is not None:  # reset_target 'capped': the tokens the kept records do not predict
                stage["reset_removed"]["capped_tokens"] = int(reset.penalty.capped_tokens)
        return theta - p.theta_hat, result, stage

    def more_steps(self, request: EditRequest, theta: torch.Tensor, progress: bool = True, reset_ids=(), teach_ids=(),
                   restore_ids=()):
        """(Θ, the solve's result, the step's record): one more Newton step on the edited objective from Θ, after
        `delta(request)`; Θ is unchanged when its line search finds no descent. `reset_ids`: removed records
        whose answers are still produced (or likely), pulled toward the base model's when the settings have
        reset_removed; with verify_reset 'parts' only their private parts' tokens, the rest held, and then corrections'
        ids here pull their old records' private parts too;
        `teach_ids`: edited records whose new answers are not produced yet, their loss weighted by the same ρ;
        `restore_ids`: kept records (ids of the data) whose answers the edit made uncertain, weighted likewise."""
        if self.refiner is None:
            self.refiner = Refiner(self.problem, request, self.systems, self.settings, self.damping, progress,
                                   self.kept_guard(request))
            self.refiner.k = max(self.settings.newton_steps, 1)
        edits, wanted = {e.id: e for e in request.edits}, list(dict.fromkeys(reset_ids))
        new_of = self.problem.sets(request).new_by_id
        at = {}  # id -> the private parts' response tokens of its old record, with verify_reset 'parts'
        if self.settings.verify_reset == "parts":
            at = {i: self.problem.part_positions(edits[i].old, edits[i].private) for i in wanted
                  if i in edits and edits[i].private and edits[i].op != "modify_query"}
            # a correction's old record past the prefix it shares with the new answer only (reset.past_shared_prefix)
            at = {i: past_shared_prefix(self.problem.examples[edits[i].index], new_of[i], v) if i in new_of and v else v
                  for i, v in at.items()}
            at = {i: v for i, v in at.items() if v}
        # a removal is pulled at its parts, else at its whole answer; a correction's old record only at its parts (its
        # whole old answer would fight the new one, which shares the sentence)
        ids = [i for i in wanted if i in edits and (edits[i].op == "remove" or i in at)]
        removed = [self.problem.examples[edits[i].index] for i in ids]
        parts = {id(self.problem.examples[edits[i].index]): at[i] for i in ids if i in at}
        taught = [new_of[i] for i in dict.fromkeys(teach_ids) if i in new_of]
        kept = dict(self.kept_records(request))
        restored = [kept[i] for i in dict.fromkeys(restore_ids) if i in kept]
        return self.refiner.step(theta, removed or None, taught or None, restored or None, parts or None)

    def kept_records(self, request: EditRequest) -> list[tuple[str, object]]:
        """(record id, encoded sample) of every record the request leaves as it is."""
        edited = {e.index for e in request.edits}
        return [(r.id, x) for i, (r, x) in enumerate(zip(self.problem.records, self.problem.examples)) if i not in edited]

    def uncertain_kept(self, request: EditRequest, theta: torch.Tensor) -> list[str]:
        """Ids of the kept records whose answer Θ̂ certainly produces and Θ no longer does: teacher-forced
        max_t −log p_t below verify.CERTAIN_NLL at Θ̂ (every token the greedy choice) and at or above it at Θ.
        Every kept record is checked (two forward passes over them, the one at Θ̂ once per request), on rank 0."""
        kept = self.kept_records(request)
        key = tuple(i for i, _ in kept)
        if self._certain[0] != key:
            nll = distributed.on_main(lambda: self.problem.worst_token_nll([x for _, x in kept], self.theta_hat))
            self._certain = (key, [k for k, v in zip(kept, nll) if v < CERTAIN_NLL])
        certain = self._certain[1]
        # Θ by identity: no code here changes a Θ in place, and the reference kept stops its id being reused
        if self._uncertain_at[0] == key and self._uncertain_at[1] is theta:
            return list(self._uncertain_at[2])
        nll = distributed.on_main(lambda: self.problem.worst_token_nll([x for _, x in certain], theta))
        ids = [i for (i, _), v in zip(certain, nll) if v >= CERTAIN_NLL]
        self._uncertain_at = (key, theta, ids)
        return list(ids)

    def kept_guard(self, request: EditRequest):
        """None, or start -> guard for the line searches from Θ_start (settings line_search_kept = f): a trial Θ
        passes when the kept records Θ̂ certainly answered and Θ does not number at most max(⌊f·certain⌋, those at
        Θ_start). Why: retraining keeps fitting them, so a scale that loses their answers moves away from it
        whatever the searched objective says, e.g. when a reset weight ρ outweighs their loss
        (docs/design.md#line-search-kept)."""
        f = self.settings.line_search_kept
        if not f:
            return None

        def from_start(start: torch.Tensor):
            before = 0 if start is self.theta_hat else len(self.uncertain_kept(request, start))

            def guard(theta: torch.Tensor):
                lost = len(self.uncertain_kept(request, theta))  # fills self._certain on a request's first call
                return lost <= max(math.floor(f * len(self._certain[1]) + 1e-9), before), lost
            return guard
        return from_start

    def accept(self, request, results, steps, neg_grad, penalty, moves: bool):
        """(index of the λ taken, its line search or None, the damping selection or None)."""
        s, p = self.settings, self.problem
        size = s.line_search_samples or s.curvature_samples
        guard = self.kept_guard(request)
        if len(results) == 1:
            if not (s.line_search and moves):
                return 0, None, None
            objective, exact = line_objective(p, request, size, s.seed, penalty)
            search = backtrack(objective, p.theta_hat, steps[0], -float(neg_grad @ steps[0]),
                               guard=guard(p.theta_hat) if guard else None)
            if not search["accepted"]:
                log.warning("line search: no scale down to %g lowered the retraining objective%s; using %g",
                            search["trace"][-1]["scale"], guard_note(search), search["scale"])
            return 0, {**search, "exact": exact}, None
        if moves:
            objective, exact = line_objective(p, request, size, s.seed, penalty)
            choice, rows = choose_step(objective, p.theta_hat, steps, neg_grad, s.line_search,
                                       guard(p.theta_hat) if guard else None)
            for r in rows:
                r["search"]["exact"] = exact
        else:  # every step is 0: nothing to search, the largest λ is taken
            choice, rows = len(steps) - 1, [{"search": None, "objective": 0.0} for _ in steps]
        selection = [{"damping": lam, "iterations": res.iterations, "final_residual": res.final_residual,
                      "scale": r["search"]["scale"] if r["search"] else 1.0,
                      "accepted": r["search"]["accepted"] if r["search"] else True, "objective": r["objective"],
                      "delta_norm": float(step.norm()), "chosen": i == choice}
                     for i, (lam, res, step, r) in enumerate(zip(s.dampings, results, steps, rows))]
        search = rows[choice]["search"]
        if search is not None and not search["accepted"]:
            log.warning("line search: no λ in %s and no scale lowered the retraining objective; using λ = %g at scale %g",
                        s.dampings, s.dampings[choice], search["scale"])
        return choice, search, selection
