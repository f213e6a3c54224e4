"""Every solver against torch.linalg.solve on the tiny model's damped curvature, in float64."""

import pytest
import torch
from torch.func import hessian

from llmeraser.curvature import Curvature, HessianOperator
from llmeraser.errors import InputError
from llmeraser.modeling import theta_of
from llmeraser.objective import CausalLMObjective
from llmeraser.render import encode
from llmeraser.solvers import SolverSettings, get_solver


@pytest.fixture(scope="module")
def problem(tiny64):
    model, tok, records = tiny64
    params, theta = theta_of(model)
    obj = CausalLMObjective(model, tok.pad_token_id)
    items = [encode(r, tok, "chat", 64) for r in records]
    full = obj.collate(items, "cpu")
    H = hessian(lambda t: obj.losses(obj.outputs(params.unflatten(t), full), full).mean())(theta)
    H = (H + H.T) / 2
    # damp the indefinite Hessian just enough to be positive definite, and no more, so the
    # system stays ill-conditioned (condition number reported by the assertion messages)
    damping = float(-torch.linalg.eigvalsh(H)[0]) + 0.05
    A = H + damping * torch.eye(len(theta), dtype=H.dtype)
    b = torch.randn(len(theta), dtype=H.dtype, generator=torch.Generator().manual_seed(3))
    x_true = torch.linalg.solve(A, b)
    curv = Curvature(obj, params, theta, "hessian", "rev_rev")
    return curv, items, damping, b, x_true, A


def rel_err(x, y):
    return float(torch.linalg.vector_norm(x - y) / torch.linalg.vector_norm(y))


def run(problem, name, batch_size, **kw):
    curv, items, damping, b, x_true, A = problem
    op = HessianOperator(curv, items, batch_size=batch_size, damping=damping, curvature_samples=0, seed=0)
    res = get_solver(name, SolverSettings(**kw)).solve(op, b, progress=False)
    return res, rel_err(res.delta, x_true), torch.linalg.cond(A)


def test_exact(problem):
    res, err, cond = run(problem, "exact", 4, tol=1e-8)
    assert err < 1e-4, (err, cond)
    assert res.converged


def test_cg(problem):
    res, err, cond = run(problem, "cg", 4, tol=1e-7, max_iters=300)
    assert err < 1e-4, (err, cond, res.iterations)
    assert res.converged


def test_stochastic_sgd(problem):
    # mini-batches of 6 of the 12 samples; 300 steps
    res, err, cond = run(problem, "stochastic", 6, tol=1e-9, max_iters=300, check_every=300)
    assert err < 5e-2, (err, cond, res.residuals)


def test_stochastic_adam(problem):
    res, err, cond = run(problem, "stochastic", 6, optimizer="adam", lr=0.02, tol=1e-9, max_iters=300, check_every=300)
    assert err < 5e-2, (err, cond, res.residuals)


def test_lissa(problem):
    res, err, cond = run(problem, "lissa", 10, tol=1e-9, max_iters=600, check_every=600)
    assert err < 5e-2, (err, cond, res.residuals)


def test_stochastic_solves_with_h_not_half_h(problem):
    """The reference code's solver converges to (½H + λI)⁻¹b; with full batches ours must hit (H + λI)⁻¹b."""
    curv, items, damping, b, x_true, A = problem
    op = HessianOperator(curv, items, batch_size=len(items), damping=damping, curvature_samples=0)
    op.sample = lambda: op.fixed[0]  # deterministic: the full batch every step
    res = get_solver("stochastic", SolverSettings(tol=1e-9, max_iters=300, check_every=300)).solve(op, b, progress=False)
    half = torch.linalg.solve(A - 0.5 * (A - damping * torch.eye(len(b), dtype=A.dtype)), b)
    assert rel_err(half, x_true) > 0.05  # the ½H answer is far from the right one here
    assert rel_err(res.delta, x_true) < 1e-3


def test_exact_refuses_large(problem):
    with pytest.raises(InputError, match="dense"):
        run(problem, "exact", 4, exact_max_params=10)


def test_cg_stops_on_negative_curvature(problem):
    curv, items, damping, b, x_true, A = problem
    op = HessianOperator(curv, items, batch_size=4, damping=0.0, curvature_samples=0)
    res = get_solver("cg", SolverSettings(tol=1e-8, max_iters=300)).solve(op, b, progress=False)
    assert not res.converged and "negative_curvature_at" in res.info
