"""The damped systems (C(Θ) + λI) x = r: building the curvature operator and running the solver on it."""

from __future__ import annotations

from dataclasses import replace

import torch

from . import distributed
from .curvature import BaseProbsCache, Curvature, HessianOperator
from .errors import NumericalError
from .problem import Problem
from .settings import UnlearnSettings
from .solvers import SolveResult, get_solver


class Systems:
    """Operators and solves for one problem; `ggn-base`'s base-model predictions are shared by every operator."""

    def __init__(self, problem: Problem, settings: UnlearnSettings):
        self.problem, self.settings = problem, settings
        self._base_probs = BaseProbsCache(memory=problem.memory)

    def operator(self, theta: torch.Tensor, items: list, damping: float, terms: tuple = ()) -> HessianOperator:
        """(C + λI) over `items` at Θ, plus each (w, E) of `terms`."""
        s, p = self.settings, self.problem
        curv = Curvature(p.objective, p.params, theta, s.curvature, s.hvp_mode, self._base_probs)
        return HessianOperator(curv, items, s.batch_size, damping, s.curvature_samples, s.seed, p.device, s.cache_batches,
                               terms=terms, memory=p.memory)

    def solve(self, op: HessianOperator, b: torch.Tensor, shifts: tuple[float, ...] = (), progress: bool = True,
              max_iters: int | None = None) -> list[SolveResult]:
        """x for (op + σI) x = b, σ = 0 first and then each of `shifts` (> 0; cg only), in one solver run."""
        if not torch.any(b != 0):  # the request changes nothing the loss sees: Δ = 0 exactly
            return [SolveResult(torch.zeros_like(b), 0, [(0, 0.0)], True, {"zero_rhs": True}) for _ in range(len(shifts) + 1)]
        solver_settings = self.settings.solver_settings
        if max_iters:
            solver_settings = replace(solver_settings, max_iters=max_iters)
        solver = get_solver(self.settings.solver, solver_settings)
        results = solver.solve_shifted(op, b, shifts, progress) if shifts else [solver.solve(op, b, progress)]
        total = distributed.all_sum_float(float(op.hvp_count))  # with several processes: over every rank
        for result in results:
            result.info["hvps"] = op.hvp_count  # this process's (rank 0's in the report)
            if distributed.active():
                result.info["processes"], result.info["hvps_all_processes"] = distributed.size(), int(total)
            result.info["hvp_mode"] = op.curvature.mode
            # decided by free memory, and worth part of a product each: explains run-to-run differences in time
            result.info["kept_linearisations"] = op.kept_linearisations
        if results[0].info.get("diverged"):
            raise NumericalError(f"the {self.settings.solver} solver diverged (residual {results[0].final_residual:.3g}); "
                                 "use solver cg, curvature ggn or a larger damping")
        return results
