"""Solver interface, settings and registry.

Every solver finds x with (C + λI) x = b for the damped curvature operator `op`, and stops on
the relative residual ‖(C+λI)x − b‖/‖b‖ computed with `op.full` on fixed training batches.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from ..curvature import HessianOperator
from ..errors import InputError


@dataclass
class SolverSettings:
    tol: float = field(default=0.05, metadata={"help": "stop when ‖(C+λI)x − b‖/‖b‖ on training batches is below this"})
    max_iters: int | None = field(default=None, metadata={"help": "iteration cap (default: 50 for cg, 1000 for stochastic/lissa)"})
    check_every: int = field(default=25, metadata={"help": "stochastic/lissa: measure the residual every this many steps"})
    optimizer: str = field(default="sgd", metadata={"help": "stochastic: the optimiser (sgd = heavy-ball momentum)", "choices": ("sgd", "adam")})
    lr: float | None = field(default=None, metadata={"help": "stochastic: step size on the b-normalised problem (default: 1/L for sgd, 0.01 for adam)"})
    momentum: float = field(default=0.9, metadata={"help": "stochastic sgd: heavy-ball momentum"})
    lissa_scale: float | None = field(default=None, metadata={"help": "lissa: the scale s > λ_max(C+λI) (default: 1.5 × a power-iteration estimate)"})
    power_iters: int = field(default=10, metadata={"help": "HVPs used to estimate λ_max for the automatic step sizes"})
    exact_max_params: int = field(default=4096, metadata={"help": "exact: refuse above this many parameters (p HVPs, p² memory)"})

    def __post_init__(self):
        if not 0 < self.tol < math.inf:
            raise InputError(f"tol {self.tol}: give a finite number > 0")
        if self.max_iters is not None and self.max_iters < 1:
            raise InputError(f"max_iters {self.max_iters}: give an integer >= 1")
        if self.check_every < 1:
            raise InputError(f"check_every {self.check_every}: give an integer >= 1")
        if self.power_iters < 1:
            raise InputError(f"power_iters {self.power_iters}: give an integer >= 1")
        if self.exact_max_params < 1:
            raise InputError(f"exact_max_params {self.exact_max_params}: give an integer >= 1")
        if self.optimizer not in ("sgd", "adam"):
            raise InputError("optimizer must be 'sgd' or 'adam'")
        if not 0 <= self.momentum < 1:
            raise InputError(f"momentum {self.momentum}: give a number in [0, 1)")
        for name in ("lr", "lissa_scale"):
            value = getattr(self, name)
            if value is not None and not 0 < value < math.inf:
                raise InputError(f"{name} {value}: give a finite number > 0")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SolveResult:
    delta: torch.Tensor  # the solution x, in the units of b
    iterations: int
    residuals: list[tuple[int, float]]  # (iteration, relative residual)
    converged: bool
    info: dict = field(default_factory=dict)

    @property
    def final_residual(self) -> float:
        return self.residuals[-1][1] if self.residuals else math.nan

    def step_record(self) -> dict:
        """What a Newton step's record keeps of its solve; the iteration at which CG met negative curvature too,
        when it did, since that step is CG's last iterate (steepest descent at iteration 1), not a solution."""
        record = {"iterations": self.iterations, "final_residual": self.final_residual, "converged": self.converged}
        if "negative_curvature_at" in self.info:
            record["negative_curvature_at"] = self.info["negative_curvature_at"]
        return record


SOLVERS: dict[str, type["Solver"]] = {}


class Solver(ABC):
    name: str = ""
    default_iters: int = 100

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if cls.name:
            if cls.name in SOLVERS:
                raise ValueError(f"solver {cls.name!r} is registered twice")
            SOLVERS[cls.name] = cls

    def __init__(self, settings: SolverSettings | None = None):
        self.settings = settings or SolverSettings()

    @property
    def max_iters(self) -> int:
        return self.settings.max_iters or self.default_iters

    @abstractmethod
    def solve(self, op: HessianOperator, b: torch.Tensor, progress: bool = True) -> SolveResult:
        """Return x ≈ (C + λI)⁻¹ b."""

    def _bar(self, progress: bool, total: int):
        return tqdm(total=total, desc=f"solve ({self.name})", disable=not progress, leave=False)


def get_solver(name: str, settings: SolverSettings | None = None) -> Solver:
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; choose one of {sorted(SOLVERS)}")
    return SOLVERS[name](settings)


def estimate_lambda_max(op: HessianOperator, iters: int, seed: int = 0) -> float:
    """Largest |eigenvalue| of the damped operator on one fixed batch, by power iteration.

    Other mini-batches can have a larger one; the stochastic solver restarts with a smaller step
    if that makes it diverge.
    """
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(op.dim, generator=g).to(op.curvature.theta_hat)
    v /= torch.linalg.vector_norm(v)
    lam = 0.0
    for _ in range(max(1, iters)):
        w = op.fixed_batch(0, v)  # the kept linearisation of batch 0 when there is one: each product is two backwards
        lam = float(torch.dot(v, w))
        n = torch.linalg.vector_norm(w)
        if n == 0:
            break
        v = w / n
    return max(abs(lam), float(torch.linalg.vector_norm(w)))
