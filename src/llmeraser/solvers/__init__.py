"""Inverse-HVP solvers, registered by name: cg, stochastic, lissa, exact."""

from . import cg, exact, lissa, stochastic  # noqa: F401  (registers the solvers)
from .base import SOLVERS, SolveResult, Solver, SolverSettings, get_solver

__all__ = ["SOLVERS", "SolveResult", "Solver", "SolverSettings", "get_solver"]
