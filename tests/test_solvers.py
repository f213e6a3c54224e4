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
    res, err, cond = run(problem, "exact", 12, tol=1e-8)  # one batch per HVP: 256 HVPs, a third of the passes
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


def test_cg_shifted_matches_separate_solves(problem):
    # one Krylov run must give every shifted system's solution, each as exact as its own CG run
    curv, items, damping, b, x_true, A = problem
    op = HessianOperator(curv, items, batch_size=4, damping=damping, curvature_samples=0, seed=0)
    shifts = (0.02, 0.3, 3.0)
    results = get_solver("cg", SolverSettings(tol=1e-10, max_iters=300)).solve_shifted(op, b, shifts, progress=False)
    assert len(results) == 4
    eye = torch.eye(len(b), dtype=A.dtype)
    for res, s in zip(results, (0.0,) + shifts):
        want = torch.linalg.solve(A + s * eye, b)
        assert rel_err(res.delta, want) < 1e-6, (s, rel_err(res.delta, want))
        # the reported residual is the shifted system's own
        true_res = float(torch.linalg.vector_norm((A + s * eye) @ res.delta - b) / torch.linalg.vector_norm(b))
        assert abs(res.final_residual - true_res) < 1e-6 + 1e-3 * true_res, (s, res.final_residual, true_res)
    # a more damped system converges no later: its residual is below the seed's at every iteration
    for (k0, r0), (k1, r1) in zip(results[0].residuals, results[3].residuals):
        assert r1 <= r0 + 1e-12


def test_cg_shifted_early_iterates(problem):
    # stopped after 3 iterations, each shift's iterate is its own CG's third iterate (same Krylov space)
    curv, items, damping, b, x_true, A = problem
    op = HessianOperator(curv, items, batch_size=4, damping=damping, curvature_samples=0, seed=0)
    solver = get_solver("cg", SolverSettings(tol=1e-12, max_iters=3))
    shifted = solver.solve_shifted(op, b, (0.5,), progress=False)[1]
    op2 = HessianOperator(curv, items, batch_size=4, damping=damping + 0.5, curvature_samples=0, seed=0)
    alone = solver.solve(op2, b, progress=False)
    assert rel_err(shifted.delta, alone.delta) < 1e-8
    assert abs(shifted.final_residual - alone.final_residual) < 1e-8


def test_cg_shifted_survives_a_shift_that_converges_long_before_the_seed(problem):
    # a huge shift's ζ shrinks by ~1e-30 an iteration and underflowed to 0 (ZeroDivisionError) before it was frozen
    curv, items, damping, b, x_true, A = problem
    op = HessianOperator(curv, items, batch_size=4, damping=damping, curvature_samples=0, seed=0)
    seed, big = get_solver("cg", SolverSettings(tol=1e-9, max_iters=300)).solve_shifted(op, b, (1e30,), progress=False)
    assert seed.iterations > 11, seed.iterations  # long enough for ζ to pass 1e-308 without the freeze
    want = torch.linalg.solve(A + 1e30 * torch.eye(len(b), dtype=A.dtype), b)
    assert rel_err(big.delta, want) < 1e-9 and big.converged
    assert rel_err(seed.delta, x_true) < 1e-5


class MatrixOperator:
    """op.full(v) = A v for an explicit matrix: all that CG asks of an operator."""

    def __init__(self, A):
        self.A = A

    def full(self, v):
        return self.A @ v


def test_a_capped_cg_lowers_the_quadratic_model_while_its_residual_grows():
    """Why a Newton step after the first may stop at CG's cap (`refine_iters`) with a residual above 1 and still be
    taken: CG's k-th iterate minimises q(x) = ½xᵀAx − bᵀx over the k-dimensional Krylov space, so q falls at every
    iteration and q(x_k) = −½bᵀx_k < 0 (Galerkin: x_kᵀr_k = 0), what a truncated Newton step wants, whatever ‖r_k‖
    does (docs/design.md#newton-backtracking). Here, eigenvalues 1e-4 … 1, the residual is 2.5–3.3 for k = 1 … 5."""
    g = torch.Generator().manual_seed(0)
    q_basis, _ = torch.linalg.qr(torch.randn(40, 40, dtype=torch.float64, generator=g))
    A = q_basis @ torch.diag(torch.logspace(-4, 0, 40, dtype=torch.float64)) @ q_basis.T
    b = torch.randn(40, dtype=torch.float64, generator=g)
    models = []
    for k in range(1, 9):
        res = get_solver("cg", SolverSettings(tol=1e-12, max_iters=k)).solve(MatrixOperator(A), b, progress=False)
        x = res.delta
        assert res.final_residual == pytest.approx(float(torch.linalg.vector_norm(A @ x - b) / b.norm()), rel=1e-9)
        assert res.final_residual > 1, k
        q = float(0.5 * x @ A @ x - b @ x)
        assert q == pytest.approx(float(-0.5 * b @ x), rel=1e-9), k
        models.append(q)
    assert all(later < earlier for earlier, later in zip([0.0] + models, models)), models


def spd(n, seed, low=-2):
    """A = Q diag(10^low … 1) Qᵀ and b, in float64."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=g))
    return q @ torch.diag(torch.logspace(low, 0, n, dtype=torch.float64)) @ q.T, torch.randn(n, dtype=torch.float64, generator=g)


def test_cg_confirms_convergence_on_the_true_residual():
    # in float32 at condition number 1e4, CG's recursive residual r_k = r_{k−1} − α_k A p_k keeps falling (8.5e-6
    # here) while the true ‖b − A x_k‖/‖b‖ stalls near 1e-4: a solve that trusted r_k claimed convergence at tol 1e-5
    A, b = spd(60, 1, low=-4)
    res = get_solver("cg", SolverSettings(tol=1e-5, max_iters=400)).solve(MatrixOperator(A.float()), b.float(), progress=False)
    true = float(torch.linalg.vector_norm(A @ res.delta.double() - b) / b.norm())
    assert res.info["recursive_residual"] < 1e-5 < true  # the recursive residual did claim it
    assert res.info["restarts"] >= 1 and not res.converged
    assert true / 2 < res.final_residual < 2 * true
    # a shifted system frozen at the restart keeps a residual derived from the recursive one: it claims nothing
    seed, shifted = get_solver("cg", SolverSettings(tol=1e-5, max_iters=400)).solve_shifted(
        MatrixOperator(A.float()), b.float(), (1e-3,), progress=False)
    assert seed.info["restarts"] >= 1 and shifted.final_residual < 1e-5 and not shifted.converged
    # where they agree (float64) one product confirms it and the solve converges, the measured residual reported
    clean = get_solver("cg", SolverSettings(tol=1e-6, max_iters=200)).solve(MatrixOperator(A), b, progress=False)
    assert "restarts" not in clean.info and clean.converged
    assert clean.final_residual == pytest.approx(float(torch.linalg.vector_norm(A @ clean.delta - b) / b.norm()), rel=1e-6)


def test_cg_negative_curvature_at_the_first_iteration_gives_the_steepest_descent_step():
    # bᵀAb < 0: x = 0 would be a zero step that a line search accepts as a no-op (it did); CG now returns b, the
    # steepest descent of q(x) = ½xᵀAx − bᵀx, and a shift positive along b its own first iterate
    A, b = spd(20, 3, low=-1)
    A = A - 2.0 * torch.eye(20, dtype=torch.float64)  # eigenvalues in [−1.9, −1]: every direction is negative
    bab, bb = float(b @ A @ b), float(b @ b)
    shifts = (0.5, 10.0)
    seed, small, large = get_solver("cg", SolverSettings(tol=1e-8, max_iters=50)).solve_shifted(
        MatrixOperator(A), b, shifts, progress=False)
    assert seed.info["negative_curvature_at"] == 1 and seed.info["steepest_descent"] and not seed.converged
    assert rel_err(seed.delta, b) < 1e-12  # −∇q(0) = b (Nocedal & Wright, Alg. 7.1)
    assert rel_err(small.delta, b) < 1e-12 and small.info["negative_curvature_at"] == 1  # A + 0.5I: still negative
    # A + 10I is positive along b: its own first CG iterate, and its record does not claim the seed's curvature
    assert rel_err(large.delta, b * bb / (bab + 10.0 * bb)) < 1e-12
    assert "negative_curvature_at" not in large.info and large.info["seed_negative_curvature_at"] == 1
    assert seed.step_record()["negative_curvature_at"] == 1 and "negative_curvature_at" not in large.step_record()
