"""request -> b -> solve -> new adapter: the orchestration behind `llmeraser unlearn`."""

from __future__ import annotations

import logging
import math
import platform
import resource
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace

import torch

from . import __version__
from .curvature import CURVATURES, GAUSS_NEWTON, HVP_MODES, BaseProbsCache, Curvature, HessianOperator, seeded_subset
from .data import EditRequest, Record, load_records, load_request
from .errors import InputError, NotConvergedError, NumericalError
from .fileio import atomic_dir, check_output_dir, sha256_file, write_json
from .modeling import (check_adapter, check_base, check_device, fused_attention, load_adapter, load_base, resolve_device,
                       theta_of, write_adapter)
from .objective import CausalLMObjective, by_length
from .render import TEMPLATES, encode, resolve_template
from .reset import OutputReset
from .rhs import gradient_sum, sum_of_gradients
from .solvers import SOLVERS, SolveResult, SolverSettings, get_solver
from .trainrecord import TrainRecord

log = logging.getLogger(__name__)

CURVATURE_DATA = ("edited", "original")
# bytes of stored hidden states (the layers below the adapter) a loss evaluation's batches may hold
PREFIX_BUDGET = 2**28


@dataclass
class UnlearnSettings:
    curvature: str = field(default="ggn", metadata={"help": "curvature C in (C + λI)Δ = b: 'ggn' (Gauss-Newton, PSD), 'ggn-base' (Gauss-Newton with the "
                                                "softmax's curvature at the base model's prediction instead of the adapter's: where the adapter "
                                                "memorised its data its own softmax is saturated, its curvature ~0, and the step to rewrite a "
                                                "memorised answer unbounded; see BENCHMARKS.md) or 'hessian'", "choices": CURVATURES})
    damping: float = field(default=0.03, metadata={"help": "λ added to C (default measured on SmolLM2, see BENCHMARKS.md); training weight decay from train.json is added to it"})
    damping_grid: tuple[float, ...] = field(default=(), metadata={"help": "more λ to try beside --damping, all in the same CG run (multi-shift CG: the "
                                                             "shifted systems reuse its curvature products, so a λ costs vector updates, "
                                                             "not HVPs; the run stops when the least damped system converges). Each λ's "
                                                             "step is line-searched on the retraining objective and the one that lowers it "
                                                             "most is kept: a small λ lets the step go far in directions only the edited "
                                                             "samples used, a large one keeps it where the quadratic model holds, and "
                                                             "which is right depends on the edit (BENCHMARKS.md). Needs --solver cg"})
    reset_removed: float = field(default=0.0, metadata={"help": "ρ: add ρ·P to the edited objective, P the distance from the removed records' outputs "
                                                         "to the base model's outputs on them, in the softmax Fisher at the mean of the base model's and "
                                                         "the adapter's predictions (so the memorised answer's tokens count, not only the base's). "
                                                         "Where the adapter memorised the removed records their gradient, and with it the paper's "
                                                         "update, is ~0; P makes the step undo what only they depend on. Its target, the base model's "
                                                         "answer, is not retraining's (which keeps what the kept data generalise to), so it is meant "
                                                         "for memorised private data (0: off, the paper's update; needs a Gauss-Newton --curvature)"})
    anchor_kept: float = field(default=0.0, metadata={"help": "κ: add κ·A to the edited objective, A the distance (in the base model's Fisher) of the kept "
                                                       "records' outputs from their outputs before the edit (over the --curvature-samples sample). "
                                                       "Zero and flat at the start, it only adds curvature: where the adapter memorised its data "
                                                       "the kept records' own curvature is ~0 (a saturated softmax) and does not hold their "
                                                       "answers in place (0: off; needs a Gauss-Newton --curvature and --newton-steps 1)"})
    solver: str = field(default="cg", metadata={"help": "inverse-HVP solver", "choices": tuple(sorted(SOLVERS))})
    batch_size: int = field(default=8, metadata={"help": "samples per gradient / HVP mini-batch"})
    curvature_data: str = field(default="edited", metadata={"help": "data the curvature is taken over: 'edited' (the data after the request, so the update is a Newton step "
                                                      "on the retraining objective, as in Guo et al. 2020) or 'original' (the paper's H of the training loss)", "choices": CURVATURE_DATA})
    curvature_samples: int = field(default=128, metadata={"help": "training samples in the fixed batches for CG and the residual (0: all)"})
    line_search_samples: int = field(default=0, metadata={"help": "kept samples the line search (and the --damping-grid choice) estimates the "
                                                          "retraining objective's kept part on (0: the --curvature-samples sample). A larger "
                                                          "seeded sample holds that one and more: records whose loss the solve did not "
                                                          "model, at one loss pass per sample and step tried (experimental)"})
    cache_batches: int = field(default=4, metadata={"help": "fixed curvature batches whose Gauss-Newton linearisation is kept in memory between CG iterations, "
                                                     "so each later product costs two backward passes instead of a forward and three backwards; "
                                                     "each holds one batch's activations, and another is kept only while free memory stays above "
                                                     "three times what the first took (0: recompute every product)"})
    hvp_mode: str = field(default="auto", metadata={"help": "how a fresh curvature product is taken: fwd_rev (forward mode where it helps: the Hessian by forward-over-reverse, "
                                             "the GGN's J v by a forward-mode pass, about a gradient's memory), rev_rev (backward passes only: double "
                                             "backprop, the GGN's J v by the double-vjp trick) or auto (the first that works)", "choices": HVP_MODES})
    max_length: int = field(default=512, metadata={"help": "tokens per sample; longer prompts are cut on the left"})
    template: str = field(default="auto", metadata={"help": "prompt rendering: the tokenizer's chat template, a plain '### User:' template, or auto (chat when the tokenizer has one)", "choices": TEMPLATES})
    newton_steps: int = field(default=1, metadata={"help": "Newton steps on the edited objective; 1 is the paper's single influence update, "
                                                  "each further step re-solves at the new point (experimental, see BENCHMARKS.md)"})
    refine_iters: int = field(default=0, metadata={"help": "solver iteration cap in each Newton step after the first (0: as --max-iters). "
                                                   "Cheaper later steps, which then stop there without a warning; the full demo uses 5 (BENCHMARKS.md)"})
    line_search: bool = field(default=True, metadata={"help": "scale the step by 1, 1/2, 1/4, … until it lowers the retraining objective (mean loss of the "
                                                    "edited set plus the training L2; with --curvature-samples below the kept records, the kept part is "
                                                    "estimated on that sample with a control variate) by the Armijo rule; "
                                                    "guards against steps far outside the quadratic model (--no-line-search: take the full step)"})
    seed: int = field(default=0, metadata={"help": "seed for batch sampling"})
    device: str = field(default="auto", metadata={"help": "'cpu', 'cuda' or 'auto'"})
    solver_settings: SolverSettings = field(default_factory=SolverSettings)

    @property
    def dampings(self) -> tuple[float, ...]:
        """Every λ to try, smallest first: --damping and --damping-grid."""
        return tuple(sorted({self.damping, *self.damping_grid}))

    def __post_init__(self):
        if self.curvature not in CURVATURES:
            raise InputError(f"--curvature must be one of {CURVATURES}")
        if self.solver not in SOLVERS:
            raise InputError(f"--solver must be one of {sorted(SOLVERS)}")
        if self.hvp_mode not in HVP_MODES:
            raise InputError(f"--hvp-mode must be one of {HVP_MODES}")
        if self.curvature_data not in CURVATURE_DATA:
            raise InputError(f"--curvature-data must be one of {CURVATURE_DATA}")
        if self.template not in TEMPLATES:
            raise InputError(f"--template must be one of {TEMPLATES}")
        check_device(self.device)
        if not 0 <= self.damping < math.inf:
            raise InputError(f"--damping {self.damping}: give a finite number >= 0")
        try:
            self.damping_grid = tuple(float(x) for x in self.damping_grid)
        except ValueError:
            raise InputError(f"--damping-grid {list(self.damping_grid)}: give numbers, e.g. --damping-grid 0.003 0.01") from None
        if any(not 0 <= x < math.inf for x in self.damping_grid):
            raise InputError(f"--damping-grid {list(self.damping_grid)}: every λ must be a finite number >= 0")
        for name in ("reset_removed", "anchor_kept"):
            if not 0 <= getattr(self, name) < math.inf:
                raise InputError(f"--{name.replace('_', '-')} {getattr(self, name)}: give a finite number >= 0")
        if len(self.dampings) > 1 and self.solver != "cg":
            raise InputError("--damping-grid needs --solver cg (its shifted systems share one CG run); "
                             f"with --solver {self.solver} give one --damping")
        gauss_newton = self.curvature in GAUSS_NEWTON
        if not self.reset_removed >= 0 or (self.reset_removed and not gauss_newton):
            raise InputError("--reset-removed must be >= 0 and needs --curvature ggn or ggn-base")
        if not self.anchor_kept >= 0 or (self.anchor_kept and (not gauss_newton or self.newton_steps > 1)):
            raise InputError("--anchor-kept must be >= 0 and needs --curvature ggn or ggn-base, and --newton-steps 1")
        if self.batch_size < 1 or self.max_length < 2 or self.curvature_samples < 0 or self.newton_steps < 1 or self.cache_batches < 0 or self.refine_iters < 0 or self.line_search_samples < 0:
            raise InputError("--batch-size and --newton-steps must be >= 1, --max-length >= 2 and --curvature-samples, --line-search-samples, --cache-batches, --refine-iters >= 0")


@dataclass
class UnlearnResult:
    out: Path | None
    delta: torch.Tensor  # ΔΘ, flat, in Θ's order
    solve: SolveResult
    meta: dict


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class Unlearner:
    """In-memory LLMEraser for a PEFT model: compute b, solve, give ΔΘ. No files are touched.

    With newton_steps = 1 this is the paper's update ΔΘ = (1/n)(C + λI)⁻¹ b at Θ̂. Each further
    step is a Newton step on the edited objective R'(Θ) = (1/n)[Σ_{kept} L_i + Σ_S L(new)] + (wd/2)‖Θ‖²
    from the current point Θ_k: Θ_{k+1} = Θ_k − (C(Θ_k) + λI)⁻¹ ∇R'(Θ_k), with the curvature of the
    edited data at Θ_k. The gradient of the n kept samples is not recomputed in full: with the
    stationarity of Θ̂ (Σ_all G_i(Θ̂)/n + wd·Θ̂ = 0) it is
        Σ_kept G_i(Θ_k) = −Σ_S G_old(Θ̂) − n·wd·Θ̂ + Σ_kept [G_i(Θ_k) − G_i(Θ̂)],
    and only the last sum, a difference that is small near Θ̂, is estimated from the fixed sample of
    `curvature_samples` kept records (a control variate). The first step from Θ̂ is exactly the paper's.
    """

    def __init__(self, model, tokenizer, records: list[Record], settings: UnlearnSettings, weight_decay: float = 0.0):
        self.model, self.tokenizer, self.records, self.settings = model, tokenizer, records, settings
        self.device = next(model.parameters()).device
        self.template = resolve_template(tokenizer, settings.template)
        self.params, self.theta_hat = theta_of(model)
        self.objective = CausalLMObjective(model, tokenizer.pad_token_id)
        # batches evaluated many times (CG's, the line search's) skip the layers below the adapter's lowest
        self.objective.freeze_prefix(self.params.names)
        self.weight_decay = weight_decay
        # the L2 term of training is part of the Hessian; with --damping-grid the operator carries the
        # smallest λ (the others are shifts of it) until `select_damping` sets the chosen one
        self.damping = settings.dampings[0] + weight_decay
        self.examples = [self.encode(r) for r in records]
        self._old_grads: dict[tuple, torch.Tensor] = {}
        self._base_probs = BaseProbsCache()  # ggn-base: every Newton step's operator sees the same batches

    @property
    def n(self) -> int:
        return len(self.records)

    def encode(self, record: Record):
        return encode(record, self.tokenizer, self.template, self.settings.max_length)

    def _grad_sum(self, items, theta, desc, progress):
        with fused_attention(self.model):  # first order: no double backward through attention here
            return sum_of_gradients(self.objective, self.params, theta, items, self.settings.batch_size, self.device,
                                    desc, progress)

    def old_grad_hat(self, request: EditRequest, progress: bool = True) -> torch.Tensor:
        """Σ_S ∇L(old) at Θ̂, computed once per request: b and the control variate both need it."""
        key = tuple(e.index for e in request.edits)
        if key not in self._old_grads:
            old = [self.examples[i] for i in key]
            self._old_grads[key] = self._grad_sum(old, self.theta_hat, "b: old samples", progress)
        return self._old_grads[key]

    def compute_rhs(self, request: EditRequest, progress: bool = True) -> torch.Tensor:
        """b = Σ_S [∇L(old) − ∇L(new)] at Θ̂, unscaled (as `rhs.compute_rhs`, keeping the old part)."""
        b = self.old_grad_hat(request, progress).clone()
        new = [self.encode(e.new) for e in request.edits if e.new is not None]
        if new:
            b -= self._grad_sum(new, self.theta_hat, "b: new samples", progress)
        return b

    def operator(self, theta: torch.Tensor | None = None, items: list | None = None) -> HessianOperator:
        s = self.settings
        theta = self.theta_hat if theta is None else theta
        curv = Curvature(self.objective, self.params, theta, s.curvature, s.hvp_mode, self._base_probs)
        return HessianOperator(curv, self.examples if items is None else items, s.batch_size, self.damping,
                               s.curvature_samples, s.seed, self.device, s.cache_batches)

    def solve(self, b: torch.Tensor, progress: bool = True, op: HessianOperator | None = None,
              max_iters: int | None = None) -> SolveResult:
        return self.solve_shifted(b, (), progress, op, max_iters)[0]

    def solve_shifted(self, b: torch.Tensor, shifts: tuple[float, ...], progress: bool = True,
                      op: HessianOperator | None = None, max_iters: int | None = None) -> list[SolveResult]:
        """x for (op + σI) x = b, σ = 0 first and then each of `shifts` (> 0; cg only), in one solver run."""
        if not torch.any(b != 0):  # the request changes nothing the loss sees: Δ = 0 exactly
            return [SolveResult(torch.zeros_like(b), 0, [(0, 0.0)], True, {"zero_rhs": True}) for _ in range(len(shifts) + 1)]
        op = op or self.operator()
        solver_settings = self.settings.solver_settings
        if max_iters:
            solver_settings = replace(solver_settings, max_iters=max_iters)
        solver = get_solver(self.settings.solver, solver_settings)
        results = solver.solve_shifted(op, b, shifts, progress) if shifts else [solver.solve(op, b, progress)]
        for result in results:
            result.info["hvps"] = op.hvp_count
            result.info["hvp_mode"] = op.curvature.mode
            # how many fixed batches kept their linearisation: decided by free memory, and worth ~1/3 of a
            # product each on the CPU, so it explains run-to-run differences in the solve's seconds
            result.info["kept_linearisations"] = len(op._linear)
        if results[0].info.get("diverged"):
            raise NumericalError(f"the {self.settings.solver} solver diverged (residual {results[0].final_residual:.3g}); "
                                 "use --solver cg, --curvature ggn or a larger --damping")
        return results

    def delta(self, request: EditRequest, progress: bool = True) -> tuple[torch.Tensor, SolveResult, dict]:
        """ΔΘ and the last solve's result, with seconds per stage and per-step diagnostics."""
        t0 = time.perf_counter()
        b = self.compute_rhs(request, progress)
        t1 = time.perf_counter()
        op, rhs, n_eff = self.first_system(request, b)
        penalties = []
        reset = self.output_reset(request)
        if reset is not None:
            rho = self.settings.reset_removed
            op.extra.append((rho / n_eff, reset.product))
            rhs = rhs - rho * reset.grad(self.theta_hat)
            penalties.append(lambda t: rho / n_eff * reset.value(t))
        anchor = self.kept_anchor(request)
        if anchor is not None:  # zero gradient at Θ̂: curvature only
            kappa = self.settings.anchor_kept * anchor.scale
            op.extra.append((kappa / n_eff, anchor.product))
            penalties.append(lambda t: kappa / n_eff * anchor.value(t))
        penalty = (lambda t: sum(f(t) for f in penalties)) if penalties else None
        # op carries the smallest λ; the others are shifts of it, solved in the same run
        shifts = tuple(lam - self.settings.dampings[0] for lam in self.settings.dampings[1:])
        results = self.solve_shifted(rhs, shifts, progress, op)
        op.release()
        if reset is not None:
            reset.release()
        moves = bool(torch.any(rhs != 0))
        # the solve was for n_eff·ΔΘ against an unscaled right-hand side
        result, step, search, selection = self.select_damping(request, results, n_eff, rhs / n_eff, penalty, moves)
        theta = self.theta_hat + (search["scale"] if search else 1.0) * step
        steps = [{"step": 1, "grad_norm": float(b.norm()), "iterations": result.iterations,
                  "final_residual": result.final_residual, "converged": result.converged, "line_search": search}]
        if selection:
            steps[0]["damping_selection"] = selection
        if self.settings.newton_steps > 1 and moves:
            # the reset enters the first step only: ρP is ~100× the data terms there, and later steps that
            # kept minimising it bought distance to the base with the kept answers (1/16 retained, BENCHMARKS.md)
            theta, result, more = self._refine(request, theta, progress)
            steps += more
        t2 = time.perf_counter()
        stage = {"b": t1 - t0, "solve": t2 - t1, "rhs_norm": float(b.norm()), "steps": steps}
        if reset is not None:  # evidence: how far the removed records' outputs are from the base model's
            stage["reset_removed"] = {"rho": self.settings.reset_removed, "distance_before": reset.value(self.theta_hat),
                                      "distance_after": reset.value(theta)}
        return theta - self.theta_hat, result, stage

    def output_reset(self, request: EditRequest) -> OutputReset | None:
        """The pull of the removed records' outputs toward the base model's (--reset-removed), or None.

        Only removals: pulling a corrected record's old answer toward the base held its new answer
        back at the same positions (measured, BENCHMARKS.md), and a modified query keeps its answer.
        """
        removed = [self.examples[e.index] for e in request.edits if e.op == "remove"]
        if not self.settings.reset_removed or not removed:
            return None
        return OutputReset(self.objective, self.params, self.theta_hat, removed, self.settings.batch_size, self.device)

    def kept_anchor(self, request: EditRequest) -> OutputReset | None:
        """The kept records' pull toward their own outputs at Θ̂ (--anchor-kept), or None.

        Over the seeded --curvature-samples sample of kept records; `scale` = kept / sample.
        """
        if not self.settings.anchor_kept:
            return None
        kept = self.kept_examples(request)
        if not kept:
            return None
        sample = seeded_subset(kept, self.settings.curvature_samples, self.settings.seed)
        anchor = OutputReset(self.objective, self.params, self.theta_hat, sample, self.settings.batch_size, self.device,
                             anchor=True)
        anchor.scale = len(kept) / len(sample)
        return anchor

    def kept_examples(self, request: EditRequest) -> list:
        """The training samples the request does not touch."""
        edited = {e.index for e in request.edits}
        return [x for i, x in enumerate(self.examples) if i not in edited]

    def edited_examples(self, request: EditRequest) -> list:
        """The training set after the request: kept samples and the new versions of edited ones."""
        return self.kept_examples(request) + [self.encode(e.new) for e in request.edits if e.new is not None]

    def first_system(self, request: EditRequest, b: torch.Tensor) -> tuple[HessianOperator, torch.Tensor, int]:
        """(operator A, right-hand side r, m) such that ΔΘ = A⁻¹r / m.

        'original': the paper's update, (C + λI)⁻¹ b / n with C over the n training samples.
        'edited': one Newton step from Θ̂ on the retraining objective
            R'(Θ) = (1/m) Σ_{edited set} L_i + (wd/2)‖Θ‖²,  m = its size.
        With Θ̂ stationary for the original objective, −∇R'(Θ̂) = [b + (n − m)·wd·Θ̂] / m. Its curvature
        leaves out the removed (and old) samples: for a sample the adapter memorised, the own-sample
        curvature in the full-data H is what shrinks the paper's step (see BENCHMARKS.md).
        """
        if self.settings.curvature_data == "original":
            return self.operator(), b, self.n
        items = self.edited_examples(request)
        if not items:
            raise InputError("the request removes every training sample; there is nothing left to fit")
        m = len(items)
        return self.operator(items=items), b + (self.n - m) * self.weight_decay * self.theta_hat, m

    def retraining_objective(self, items, theta: torch.Tensor, batches: list[dict] | None = None) -> float:
        """Mean loss over `items` plus the training L2, (wd/2)‖Θ‖²; `batches`: `items` already batched."""
        batches = self._batches(items, prepare=False) if batches is None else batches
        return self._loss_of(batches, theta) / len(items) + 0.5 * self.weight_decay * float(theta.square().sum())

    def select_damping(self, request: EditRequest, results: list[SolveResult], n_eff: int, neg_grad: torch.Tensor,
                       penalty, moves: bool):
        """(result, step, line search, selection) for the λ of `settings.dampings` whose line-searched step
        lowers the retraining objective most; one λ: the usual line search, and no selection.

        Sets `self.damping` to the chosen λ (plus the training weight decay), which later Newton steps use.
        A λ whose search finds no descent is kept only when no λ does; ties go to the larger λ.
        """
        lams = self.settings.dampings
        if len(results) == 1:
            step = results[0].delta / n_eff
            search = self.line_search(request, step, neg_grad, penalty) if self.settings.line_search and moves else None
            return results[0], step, search, None
        objective, exact = self.line_objective(request, penalty) if moves else (None, True)
        start, rows = None, []
        for lam, res in zip(lams, results):
            step = res.delta / n_eff
            search = None
            if moves:  # without the line search only the full step is scored, and taken
                search = backtrack(objective, self.theta_hat, step, -float(neg_grad @ step),
                                   10 if self.settings.line_search else 0, start=start)
                search["exact"] = exact
                start = search["start"]
            # the objective at the scale the search settled on (min() over the trace would return a NaN of a wild full step)
            value = next(t["objective"] for t in search["trace"] if t["scale"] == search["scale"]) if search else 0.0
            rows.append((lam, res, step, search, value))
        accepted = [r for r in rows if r[3] is None or r[3]["accepted"]] or rows[-1:]
        best = min(reversed(accepted), key=lambda r: r[4])  # reversed: a tie goes to the larger λ
        lam, result, step, search, _ = best
        self.damping = lam + self.weight_decay
        selection = [{"damping": r[0], "iterations": r[1].iterations, "final_residual": r[1].final_residual,
                      "scale": r[3]["scale"] if r[3] else 1.0, "accepted": r[3]["accepted"] if r[3] else True,
                      "objective": r[4], "delta_norm": float(r[2].norm()), "chosen": r is best} for r in rows]
        if search is not None and not search["accepted"]:
            log.warning("line search: no λ in %s and no scale lowered the retraining objective; using λ = %g at scale %g",
                        lams, lam, search["scale"])
        return result, step, search, selection

    def line_search(self, request: EditRequest, step: torch.Tensor, neg_grad: torch.Tensor, penalty=None,
                    max_halvings: int = 10) -> dict:
        """Backtracking (Armijo) on R'(Θ̂ + αΔ), the retraining objective, from a seeded sample of the edited set.

        ΔΘ solves a quadratic model of R' around Θ̂. At an adapter that memorised its data the model can
        be wrong far from Θ̂ (near-zero curvature, a corrected response with a large gradient), and the
        full step can wreck the adapter. −∇R'(Θ̂) = `neg_grad` (from b, as in the solve) gives the slope;
        `penalty(Θ)`, when given, is added to R' (the --reset-removed term, whose gradient is in neg_grad).
        """
        objective, exact = self.line_objective(request, penalty)
        slope = -float(neg_grad @ step)  # directional derivative of R' along ΔΘ at Θ̂ (< 0: a descent direction)
        search = backtrack(objective, self.theta_hat, step, slope, max_halvings)
        if not search["accepted"]:
            log.warning("line search: no scale down to %g lowered the retraining objective; using %g",
                        search["trace"][-1]["scale"], search["scale"])
        return {**search, "exact": exact}

    def line_objective(self, request: EditRequest, penalty=None):
        """(f, exact): f(Θ) = R'(Θ) up to a constant, and whether it is R' itself; `penalty(Θ)` is added.

        When every kept sample fits in `curvature_samples`, f is R' over the edited set. Otherwise the
        kept samples' part is the control variate of `_control_variate`, whose slope at Θ̂ is the one the
        solve used; the sample's own slope differs, and without the correction the search rejected a
        converged removal step at every scale (measured, BENCHMARKS.md).
        """
        n_kept = self.n - len({e.index for e in request.edits})
        size = self.settings.line_search_samples or self.settings.curvature_samples
        if not size or size >= n_kept:
            items = self.edited_examples(request)
            batches = self._batches(items)
            f = _Objective(lambda t: self.retraining_objective(items, t, batches))
            exact = True
        else:
            cv = self._control_variate(request, "line search", False, size)
            m = n_kept + len(cv.new)
            f = _Objective(lambda t, **kw: cv.data_part(t, **kw) / m + 0.5 * self.weight_decay * float(t.square().sum()),
                           at=self.theta_hat)
            # at Θ̂ the sample's part is 0 by construction: R'(Θ̂) needs only the new samples' losses
            f.start = f(self.theta_hat, sample=False)
            exact = False
        if penalty is None:
            return f, exact
        g = _Objective(lambda t: f(t) + penalty(t), at=f.at)
        if f.start is not None:
            g.start = f.start + penalty(self.theta_hat)
        return g, exact

    def _control_variate(self, request: EditRequest, desc: str, progress: bool, size: int | None = None) -> SimpleNamespace:
        """Σ_kept L_i(Θ) + Σ_new L(Θ), up to a constant, from a seeded sample of the kept records:
            data_part(Θ) = s·Σ_sample [L_i(Θ) − L_i(Θ̂)] + (g_kept − s·g_sample)·(Θ − Θ̂) + Σ_new L(Θ),
        s = |kept|/|sample|, g_kept = −Σ_S ∇L_old(Θ̂) − n·wd·Θ̂ by the stationarity of Θ̂, so that its
        slope at Θ̂ is the one b gives. Shared by the line search and the refinement steps."""
        kept = self.kept_examples(request)
        new = [self.encode(e.new) for e in request.edits if e.new is not None]
        sample = seeded_subset(kept, size or self.settings.curvature_samples, self.settings.seed)
        scale = len(kept) / len(sample)
        g_old_hat = self.old_grad_hat(request, progress)
        sample_batches, new_batches = self._batches(sample), self._batches(new)
        with fused_attention(self.model):
            g_sample_hat = gradient_sum(self.objective, self.params, self.theta_hat, sample_batches,
                                        f"{desc}: kept sample at Θ̂", progress)
        linear = -g_old_hat - self.n * self.weight_decay * self.theta_hat - scale * g_sample_hat
        base = self._loss_of(sample_batches, self.theta_hat)

        def data_part(t, sample=True):
            """`sample=False` at Θ̂ only, where the sample's term is exactly 0 (the same passes as `base`)."""
            val = scale * (self._loss_of(sample_batches, t) - base) + float(linear @ (t - self.theta_hat)) if sample else 0.0
            return val + (self._loss_of(new_batches, t) if new else 0.0)

        return SimpleNamespace(kept=kept, new=new, sample=sample, scale=scale, g_old_hat=g_old_hat,
                               g_sample_hat=g_sample_hat, data_part=data_part)

    def _refine(self, request, theta, progress):
        cv = self._control_variate(request, "refine", progress)
        kept, new, sample, scale = cv.kept, cv.new, cv.sample, cv.scale
        g_old_hat, g_sample_hat = cv.g_old_hat, cv.g_sample_hat
        m = len(kept) + len(new)

        def objective(t):
            """n·R'(Θ) + const under the same stationarity assumption as the gradient, so the two agree."""
            return cv.data_part(t) + 0.5 * self.n * self.weight_decay * float(t.square().sum())

        steps, result, value = [], None, None
        for k in range(2, self.settings.newton_steps + 1):
            op = self.operator(theta, kept + new)
            if self._gradient_from_operator(m):
                # Σ_kept G_i(Θ_k) + Σ_new G(Θ_k) through the linearisations the solve then reuses: one
                # backward a batch instead of a forward and a backward (sample = kept here, scale = 1)
                g_sample_and_new = op.loss_gradient()[0]
            else:
                g_sample_and_new = scale * self._grad_sum(sample, theta, "refine: kept sample", progress)
                if new:
                    g_sample_and_new += self._grad_sum(new, theta, "refine: new samples", progress)
            # n·∇R'(Θ_k), see the class docstring
            grad = g_sample_and_new - scale * g_sample_hat - g_old_hat + self.n * self.weight_decay * (theta - self.theta_hat)
            result = self.solve(-grad, progress, op, self.settings.refine_iters or None)
            op.release()
            # op is the mean curvature over the m edited samples: x = m·Δ for the summed objective
            step = result.delta / m
            # backtracking along the solved direction: a few loss evaluations, where re-solving with more
            # damping (Levenberg-Marquardt) cost a full solve per try and was rejected four times (BENCHMARKS.md)
            search = backtrack(objective, theta, step, float(grad @ step), start=value)  # f(Θ_k): the last accepted value
            steps.append({"step": k, "grad_norm": float(grad.norm()), "iterations": result.iterations,
                          "final_residual": result.final_residual, "converged": result.converged, "line_search": search})
            if not search["accepted"]:
                break
            theta = theta + search["scale"] * step
            value = search["trace"][-1]["objective"]
        return theta, result, steps

    def _gradient_from_operator(self, m: int) -> bool:
        """Whether a refinement step's operator over the m edited samples holds all of them (so its
        linearisations give the step's gradient too): a Gauss-Newton curvature over every sample."""
        return self.settings.curvature in GAUSS_NEWTON and (not self.settings.curvature_samples or self.settings.curvature_samples >= m)

    def _loss_sum(self, items, theta) -> float:
        return self._loss_of(self._batches(items, prepare=False), theta)

    def _batches(self, items, prepare: bool = True) -> list[dict]:
        """`items` in batches by length, for loss values at many Θ. With `prepare`, each of the first
        batches up to PREFIX_BUDGET bytes stores the output of the layers below the adapter, so later
        passes start above them (`CausalLMObjective.prepare`; with the attention kernel the loss passes use)."""
        items, bs, out, used = by_length(items), self.settings.batch_size, [], 0
        with torch.no_grad(), fused_attention(self.model):
            for i in range(0, len(items), bs):
                batch = self.objective.collate(items[i:i + bs], self.device)
                if prepare and used < PREFIX_BUDGET:
                    batch = self.objective.prepare(batch)
                    if "prefix" in batch:
                        used += batch["prefix"].numel() * batch["prefix"].element_size()
                out.append(batch)
        return out

    def _loss_of(self, batches: list[dict], theta) -> float:
        total = 0.0
        with torch.no_grad(), fused_attention(self.model):
            for batch in batches:
                total += float(self.objective.losses(self.objective.outputs(self.params.unflatten(theta), batch), batch).sum())
        return total


class _Objective:
    """A line-search objective f(Θ), with `start` = f(`at`) where it is known without a pass."""

    def __init__(self, f, at: torch.Tensor | None = None):
        self.f, self.start, self.at = f, None, at

    def __call__(self, theta, **kw):
        return self.f(theta, **kw)


def backtrack(objective, theta: torch.Tensor, step: torch.Tensor, slope: float, max_halvings: int = 10,
              start: float | None = None) -> dict:
    """Armijo backtracking: the first α in 1, 1/2, … with f(Θ + αΔ) <= f(Θ) + 1e-4·α·slope.

    `start`, when known, is f(Θ) (else `objective.start` where the objective knows its value at this very Θ).
    Without such an α it reports the best α tried and accepted = False (the caller decides)."""
    if start is None and getattr(objective, "at", None) is theta:
        start = objective.start
    start = objective(theta) if start is None else start
    trace, alpha = [], 1.0
    for _ in range(max_halvings + 1):
        value = objective(theta + alpha * step)
        trace.append({"scale": alpha, "objective": value})
        if value == value and value <= start + 1e-4 * alpha * slope:
            return {"scale": alpha, "accepted": True, "start": start, "slope": slope, "trace": trace}
        alpha /= 2
    best = min(trace, key=lambda t: t["objective"] if t["objective"] == t["objective"] else float("inf"))
    return {"scale": best["scale"], "accepted": False, "start": start, "slope": slope, "trace": trace}


def _versions() -> dict:
    import peft
    import transformers

    return {"llmeraser": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "python": sys.version.split()[0], "platform": platform.platform()}


def unlearn(base: str, adapter: str | Path, data: str | Path, request: str | Path, out: str | Path | None,
            settings: UnlearnSettings | None = None, overwrite: bool = False, progress: bool = True,
            model_and_tokenizer=None, allow_other_data: bool = False, allow_unconverged: bool = False) -> UnlearnResult:
    """Apply an edit request to a PEFT adapter by the LLMEraser influence update; write a new adapter.

    Every input is checked before any model is loaded (output place, base, adapter, train.json, data,
    request); nothing is written unless the whole computation succeeds.

    Args:
        base: model folder, .gguf file, or 'smollm2'.
        adapter: the PEFT adapter folder (never modified).
        data: the training data the adapter was trained on (JSONL or JSON array); checked against the
            SHA-256 and n in the adapter's train.json unless `allow_other_data`.
        request: the edit request (JSONL).
        out: the new adapter folder, written atomically; None computes without writing.
        model_and_tokenizer: an already loaded (base model, tokenizer) to use instead of `base`.
        allow_unconverged: write the result even when a solve stopped above its tolerance (otherwise
            NotConvergedError, and nothing is written).
    """
    settings = settings or UnlearnSettings()
    adapter = Path(adapter)
    inputs = (adapter, data, request, base)
    if out is not None:
        out = check_output_dir(out, overwrite, inputs=inputs)
    t_start = time.perf_counter()
    if model_and_tokenizer is None:
        check_base(base)
    check_adapter(adapter)
    record = TrainRecord.read(adapter)
    records = load_records(data)
    req = load_request(request, records)
    if record is not None and not allow_other_data:
        record.check_data(data, sha256_file(data), len(records))
    device = resolve_device(settings.device)
    if model_and_tokenizer is None:
        base_model, tokenizer = load_base(base, device)
    else:
        base_model, tokenizer = model_and_tokenizer
    model = load_adapter(base_model, adapter)
    try:
        wd = record.weight_decay if record else 0.0
        return _unlearn(model, tokenizer, adapter, data, request, out, settings, overwrite, progress, base, records, req,
                        device, t_start, wd, inputs, allow_unconverged)
    finally:
        model.unload()  # hand a caller's base model back without the adapter's layers


def _unlearn(model, tokenizer, adapter, data, request, out, settings, overwrite, progress, base, records, req, device, t_start,
             wd, inputs, allow_unconverged):
    unl = Unlearner(model, tokenizer, records, settings, weight_decay=wd)
    n = len(records)
    log.info("n = %d training samples; %d edits %s", n, len(req.edits), req.counts)
    log.info(unl.params.summary())
    if progress:
        print(f"llmeraser: n = {n} training samples, {len(req.edits)} edits {req.counts}", file=sys.stderr)
        print(f"llmeraser: {unl.params.summary()}", file=sys.stderr)
    t_load = time.perf_counter() - t_start
    delta, result, stage = unl.delta(req, progress)
    theta_new = unl.theta_hat + delta
    if not bool(torch.isfinite(theta_new).all()):
        raise NumericalError("the update is not finite; nothing was written. Try a larger --damping or --curvature ggn")
    truncated_new = sum(unl.encode(e.new).truncated for e in req.edits if e.new is not None)
    meta = {
        "request": {"path": str(Path(request).resolve()), "sha256": req.sha256, "edits": req.raw},
        "data": {"path": str(Path(data).resolve()), "sha256": sha256_file(data)},
        "adapter": str(adapter.resolve()),
        "base": base,
        "n": n,
        "affected": len(req.edits),
        "counts": req.counts,
        "parameters": unl.params.numel,
        "settings": asdict(settings),
        "damping": unl.damping - wd,  # the chosen λ where --damping-grid gave several
        "damping_total": unl.damping,
        "training_weight_decay": wd,
        "template": unl.template,
        # every sample cut to --max-length: training records and the request's new versions
        "truncated_samples": sum(e.truncated for e in unl.examples) + truncated_new,
        "truncated_new_versions": truncated_new,
        "solver": {"name": settings.solver, "iterations": result.iterations, "converged": result.converged,
                   "final_residual": result.final_residual, "residuals": result.residuals,
                   **{k: v for k, v in result.info.items()}},
        "rhs_norm": stage["rhs_norm"],
        "newton_steps": stage["steps"],
        "reset_removed": stage.get("reset_removed"),
        "delta_norm": float(delta.norm()),
        "theta_norm": float(unl.theta_hat.norm()),
        "seconds": {"load": t_load, "b": stage["b"], "solve": stage["solve"]},
        "versions": _versions(),
    }
    # a Newton step after the first stops at --refine-iters by design when that is set: not a failure
    short = [st for st in stage["steps"] if not st["converged"] and (st["step"] == 1 or not settings.refine_iters)]
    meta["converged"] = not short
    for st in short:
        print(f"llmeraser: warning: in Newton step {st['step']} the solver stopped at residual {st['final_residual']:.3g} "
              f"above tol {settings.solver_settings.tol} after {st['iterations']} iterations", file=sys.stderr)
    if short and not allow_unconverged:
        st = short[0]
        raise NotConvergedError(
            f"the solve did not converge (Newton step {st['step']}: residual {st['final_residual']:.3g} > tol "
            f"{settings.solver_settings.tol} after {st['iterations']} iterations), so the update is not the influence "
            f"estimate and nothing was written{' to ' + str(out) if out is not None else ''}. Raise --max-iters or "
            "--damping, or pass --allow-unconverged to write it anyway (unlearn.json then records converged: false)")
    if out is not None:
        t0 = time.perf_counter()
        with atomic_dir(out, overwrite, inputs) as tmp:
            write_adapter(model, unl.params, theta_new, adapter, tmp)
            meta["seconds"]["save"] = time.perf_counter() - t0
            meta["peak_memory_mb"] = peak_memory_mb(device)
            write_json(tmp / "unlearn.json", meta)
    else:
        meta["peak_memory_mb"] = peak_memory_mb(device)
    return UnlearnResult(out, delta, result, meta)
