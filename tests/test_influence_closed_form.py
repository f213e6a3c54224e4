"""Influence estimates vs exact retraining on L2-regularised logistic regression.

The model is run through the same gradient sums (`sum_of_gradients`), curvature operator and solvers
as the LLM path; only the Objective differs. Exact retraining is Newton's method in float64.
"""

import torch

from llmeraser.curvature import Curvature, HessianOperator
from llmeraser.objective import Objective
from llmeraser.params import AdapterParams
from llmeraser.rhs import sum_of_gradients
from llmeraser.solvers import SolverSettings, get_solver

WD = 1e-2  # L2 coefficient of the training objective: it is the damping λ


class Logistic(Objective):
    def collate(self, items, device):
        return {"n": len(items), "x": torch.stack([i[0] for i in items]), "y": torch.stack([i[1] for i in items])}

    def outputs(self, params, batch):
        return batch["x"] @ params["w"] + params["b"]

    def losses(self, outputs, batch):
        return torch.nn.functional.binary_cross_entropy_with_logits(outputs, batch["y"], reduction="none")


def make_data(n, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(d, generator=g, dtype=torch.float64)
    y = (torch.rand(n, generator=g, dtype=torch.float64) < torch.sigmoid(x @ w + 0.3)).double()
    return x, y


def fit(x, y, iters=30):
    """argmin_θ mean BCE + (WD/2)‖θ‖² by Newton's method (θ = [w, b])."""
    xa = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    theta = torch.zeros(xa.shape[1], dtype=x.dtype)
    for _ in range(iters):
        p = torch.sigmoid(xa @ theta)
        g = xa.T @ (p - y) / len(y) + WD * theta
        h = (xa * (p * (1 - p))[:, None]).T @ xa / len(y) + WD * torch.eye(len(theta), dtype=x.dtype)
        theta = theta - torch.linalg.solve(h, g)
    return theta


def influence(x, y, theta_hat, removed, solver="cg", curvature="hessian"):
    obj = Logistic()
    params = AdapterParams.from_tensors({"w": theta_hat[:-1], "b": theta_hat[-1:]})
    flat = params.flatten({"b": theta_hat[-1:], "w": theta_hat[:-1]})  # Θ's order is by name
    items = list(zip(x, y))
    b = sum_of_gradients(obj, params, flat, [items[i] for i in removed], batch_size=16, progress=False)
    op = HessianOperator(Curvature(obj, params, flat, curvature), items, batch_size=64, damping=WD, curvature_samples=0)
    res = get_solver(solver, SolverSettings(tol=1e-10, max_iters=200)).solve(op, b, progress=False)
    delta = res.delta / len(items)
    return torch.cat([delta[1:], delta[:1]])  # back to [w, b]


def test_leave_one_out_matches_retraining():
    x, y = make_data(200)
    theta_hat = fit(x, y)
    predicted, exact = [], []
    for j in range(len(y)):
        keep = torch.arange(len(y)) != j
        exact.append(fit(x[keep], y[keep]) - theta_hat)
        predicted.append(influence(x, y, theta_hat, [j]))
    p, e = torch.stack(predicted).flatten(), torch.stack(exact).flatten()
    pearson = torch.corrcoef(torch.stack([p, e]))[0, 1]
    assert pearson > 0.95, pearson
    # sign and scale are right, not just the correlation: the fitted slope is near 1
    slope = (p @ e) / (p @ p)
    assert 0.8 < slope < 1.25, slope


def test_remove_one_percent_set_matches_retraining():
    x, y = make_data(1000, seed=1)
    theta_hat = fit(x, y)
    removed = torch.randperm(1000, generator=torch.Generator().manual_seed(0))[:10].tolist()
    keep = torch.ones(1000, dtype=torch.bool)
    keep[removed] = False
    exact = fit(x[keep], y[keep]) - theta_hat
    for curvature in ("hessian", "ggn"):  # for logistic regression the two coincide
        pred = influence(x, y, theta_hat, removed, curvature=curvature)
        cos = torch.nn.functional.cosine_similarity(pred, exact, dim=0)
        assert cos > 0.99, (curvature, cos)
        assert 0.8 < pred.norm() / exact.norm() < 1.25


def test_wrong_sign_or_half_h_would_fail():
    """Guards the thresholds above: a flipped sign or the reference code's ½H breaks them."""
    x, y = make_data(1000, seed=1)
    theta_hat = fit(x, y)
    removed = list(range(10))
    keep = torch.ones(1000, dtype=torch.bool)
    keep[removed] = False
    exact = fit(x[keep], y[keep]) - theta_hat
    pred = influence(x, y, theta_hat, removed)
    assert torch.nn.functional.cosine_similarity(-pred, exact, dim=0) < 0
    assert not 0.8 < (2 * pred).norm() / exact.norm() < 1.25
