"""Curvature-vector products against explicit matrices on a tiny Llama + LoRA, in float64."""

import pytest
import torch
from torch.func import hessian, jacrev

from llmeraser.curvature import Curvature, HessianOperator
from llmeraser.modeling import theta_of
from llmeraser.objective import CausalLMObjective
from llmeraser.render import encode

from helpers import DEVICE

# HF's eager attention takes its softmax in float32, so float64 agreement stops near 1e-8.
RTOL = 1e-6


def setup(tiny64):
    model, tok, records = tiny64
    params, theta = theta_of(model)
    obj = CausalLMObjective(model, tok.pad_token_id)
    batch = obj.collate([encode(r, tok, "chat", 64) for r in records[:5]], DEVICE)
    return obj, params, theta, batch


def operator_inputs(tiny64, kind="ggn"):
    """(obj, params, theta, items, curvature) for HessianOperator tests: 10 records, so batches of 4 make 3."""
    model, tok, records = tiny64
    params, theta = theta_of(model)
    obj = CausalLMObjective(model, tok.pad_token_id)
    items = [encode(r, tok, "chat", 64) for r in records[:10]]
    return obj, params, theta, items, Curvature(obj, params, theta, kind)


def close(a, b):
    return torch.linalg.vector_norm(a - b) <= RTOL * torch.linalg.vector_norm(b)


@pytest.mark.parametrize("mode", ["fwd_rev", "rev_rev", "auto"])
def test_hvp_matches_explicit_hessian(tiny64, mode):
    obj, params, theta, batch = setup(tiny64)
    H = hessian(lambda t: obj.losses(obj.outputs(params.unflatten(t), batch), batch).mean())(theta)
    v = torch.randn(theta.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    hv = Curvature(obj, params, theta, "hessian", mode)(v, batch)
    assert close(hv, H @ v)
    # the Hessian at a random adapter is indefinite: the test case is not a trivial one
    assert torch.linalg.eigvalsh(H)[0] < 0


@pytest.mark.parametrize("mode", ["fwd_rev", "rev_rev", "auto"])
def test_ggn_matches_explicit_jt_hz_j(tiny64, mode):
    """J v by forward mode (fwd_rev, which auto picks where it works) or by the double-vjp trick (rev_rev)."""
    obj, params, theta, batch = setup(tiny64)
    z = obj.outputs(params.unflatten(theta), batch)
    J = jacrev(lambda t: obj.outputs(params.unflatten(t), batch))(theta).reshape(z.numel(), -1)
    Hz = hessian(lambda zz: obj.losses(zz, batch).mean())(z.detach()).reshape(z.numel(), z.numel())
    G = J.T @ Hz @ J
    v = torch.randn(theta.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    curv = Curvature(obj, params, theta, "ggn", mode)
    gv = curv(v, batch)
    assert close(gv, G @ v)
    assert curv.mode == ("rev_rev" if mode == "rev_rev" else "fwd_rev")
    assert torch.linalg.eigvalsh((G + G.T) / 2)[0] > -1e-10  # PSD by construction
    # and it is not the Hessian
    hv = Curvature(obj, params, theta, "hessian")(v, batch)
    assert not close(gv, hv)


def test_hvp_leaves_model_untouched(tiny64):
    obj, params, theta, batch = setup(tiny64)
    before = {n: p.clone() for n, p in obj.model.named_parameters()}
    Curvature(obj, params, theta, "hessian", "rev_rev")(torch.ones_like(theta), batch)
    Curvature(obj, params, theta, "ggn")(torch.ones_like(theta), batch)
    assert all(torch.equal(before[n], p) for n, p in obj.model.named_parameters())


def test_cached_ggn_linearisation_matches_fresh_products(tiny64):
    """The operator's kept linearisation gives the same G v, call after call, as a fresh product."""
    obj, params, theta, items, curv = operator_inputs(tiny64)
    cached = HessianOperator(curv, items, batch_size=4, damping=0.1, curvature_samples=0, cache_batches=2, device=DEVICE)
    fresh = HessianOperator(curv, items, batch_size=4, damping=0.1, curvature_samples=0, cache_batches=0, device=DEVICE)
    g = torch.Generator().manual_seed(3)
    for _ in range(3):  # the retained graphs must survive repeated use
        v = torch.randn(theta.numel(), dtype=torch.float64, generator=g).to(DEVICE)
        assert close(cached.full(v), fresh.full(v))
    assert len(cached._linear) == 2  # 3 fixed batches, 2 of them cached
    cached.release()  # a finished Newton step drops its graphs; a later product rebuilds them
    assert not cached._linear
    assert close(cached.full(v), fresh.full(v))
    assert len(cached._linear) == 2


def test_response_logits_only_match_the_full_projection(tiny64):
    """Projecting only the response positions onto the vocabulary changes nothing but the cost."""
    obj, params, theta, batch = setup(tiny64)
    assert batch["keep"].numel() < batch["input_ids"].shape[1]  # the test case does skip positions
    kept = obj.outputs(params.unflatten(theta), batch)
    obj.keeps_logits = False
    full = obj.outputs(params.unflatten(theta), batch)
    assert torch.allclose(kept, full, rtol=1e-12, atol=1e-14)  # float64; only the matmul blocking differs


def test_ggn_base_is_the_gauss_newton_at_the_base_models_softmax(tiny64):
    """ggn-base: G⁰ = (1/B) Σ_i Σ_t (1/T_i) J_tᵀ (diag p⁰ − p⁰p⁰ᵀ) J_t with p⁰ the base model's prediction,
    against explicit Jacobians; and at an adapter whose lora_B is zero it is the GGN itself."""
    from torch.func import jacrev

    from llmeraser.curvature import Curvature
    from llmeraser.modeling import theta_of
    from llmeraser.objective import CausalLMObjective
    from llmeraser.params import zero_adapter
    from llmeraser.render import encode

    model, tok, records = tiny64
    params, theta = theta_of(model)
    obj = CausalLMObjective(model, tok.pad_token_id)
    batch = obj.collate([encode(r, tok, "chat", 64) for r in records[:3]], DEVICE)
    v = torch.randn(theta.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    with model.disable_adapter(), torch.no_grad():
        p0 = torch.softmax(obj.outputs({}, batch), -1)
    J = jacrev(lambda t: obj.outputs(params.unflatten(t), batch))(theta)  # [rows, vocab, dim]
    w = 1.0 / batch["counts"][batch["rows"]].double()
    jv = J @ v
    expected = sum(wt * J[r].T @ ((torch.diag(p0[r]) - torch.outer(p0[r], p0[r])) @ jv[r]) for r, wt in enumerate(w)) / 3
    curv = Curvature(obj, params, theta, "ggn-base")
    assert torch.allclose(curv(v, batch), expected, rtol=1e-6)
    assert torch.allclose(Curvature(obj, params, theta, "ggn-base", "rev_rev")(v, batch), expected, rtol=1e-6)
    assert torch.allclose(curv.linearise(batch)(v), expected, rtol=1e-6)  # the kept linearisation agrees
    # the trained adapter predicts differently from the base, so the two curvatures differ there ...
    assert not torch.allclose(Curvature(obj, params, theta, "ggn")(v, batch), expected, rtol=1e-2)
    # ... and coincide where the adapter is a no-op (every lora_B zero)
    theta0 = zero_adapter(params, theta)
    assert torch.allclose(Curvature(obj, params, theta0, "ggn-base")(v, batch),
                          Curvature(obj, params, theta0, "ggn")(v, batch), rtol=1e-10, atol=1e-14)


def test_fixed_batches_are_grouped_by_length_and_average_every_sample(tiny64):
    """Batches of similar length pad less; the operator is still the mean over samples of C_i v (a slow
    loop of one-sample products)."""
    model, tok, records = tiny64
    params, theta = theta_of(model)
    obj = CausalLMObjective(model, tok.pad_token_id)
    # cut to varied lengths (prompts are cut on the left), so the grouping matters
    items = [encode(r, tok, "chat", 20 + 3 * (i % 5)) for i, r in enumerate(records[:10])]
    assert len({len(e.input_ids) for e in items}) == 5
    curv = Curvature(obj, params, theta, "ggn")
    op = HessianOperator(curv, items, batch_size=4, damping=0.1, curvature_samples=0, cache_batches=0, device=DEVICE)
    widths = [b["input_ids"].shape[1] for b in op.fixed]
    assert widths == sorted(widths)
    padded = sum(b["input_ids"].numel() for b in op.fixed)
    unsorted = sum(len(items[i:i + 4]) * max(len(e.input_ids) for e in items[i:i + 4]) for i in range(0, 10, 4))
    assert padded <= unsorted
    v = torch.randn(theta.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    slow = sum(curv(v, obj.collate([e], DEVICE)) for e in items) / len(items) + 0.1 * v
    assert close(op.full(v), slow)


@pytest.mark.parametrize("kind", ["ggn", "ggn-base"])
def test_operator_gradient_through_its_linearisations_is_the_sum_of_gradients(tiny64, kind):
    """A Newton step takes its gradient from the linearisations its products use (kept or not); it is
    Σ_i ∇L_i and Σ_i L_i over the fixed batches, and the kept graphs still serve the products after it."""
    from llmeraser.rhs import sum_of_gradients

    obj, params, theta, items, curv = operator_inputs(tiny64, kind)
    op = HessianOperator(curv, items, batch_size=4, damping=0.1, curvature_samples=0, cache_batches=2, device=DEVICE)
    grad, loss = op.loss_gradient()
    assert len(op._linear) == 2  # two batches through kept linearisations, the third through a fresh one
    assert close(grad, sum_of_gradients(obj, params, theta, items, 4, DEVICE, progress=False))
    with torch.no_grad():
        expected = float(obj.losses(obj.outputs(params.unflatten(theta), obj.collate(items, DEVICE)), obj.collate(items, DEVICE)).sum())
    assert abs(loss - expected) <= 1e-10 * abs(expected)
    fresh = HessianOperator(curv, items, batch_size=4, damping=0.1, curvature_samples=0, cache_batches=0, device=DEVICE)
    v = torch.randn(theta.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    assert close(op.full(v), fresh.full(v))


def test_base_probs_are_computed_once_for_every_newton_steps_operator(tiny64):
    """p⁰ (lora_B zeroed) does not depend on the LoRA weights: a later step's operator at another Θ reuses it,
    with the same products as without the cache; Θ with non-LoRA tensors is not cached."""
    from llmeraser.curvature import BaseProbsCache
    from llmeraser.params import AdapterParams

    obj, params, theta, batch = setup(tiny64)
    cache = BaseProbsCache()
    calls = []
    outputs = obj.outputs
    obj.outputs = lambda p, b: calls.append(1) or outputs(p, b)
    try:
        v = torch.randn(theta.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(6)).to(DEVICE)
        first = Curvature(obj, params, theta, "ggn-base", base_cache=cache)(v, batch)
        assert close(first, Curvature(obj, params, theta, "ggn-base")(v, batch))
        moved = theta + 0.1 * torch.randn(theta.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(7)).to(DEVICE)
        calls.clear()
        again = Curvature(obj, params, moved, "ggn-base", base_cache=cache)(v, batch)
        assert len(calls) == 2  # the product's own passes only (forward mode, then a forward for Jᵀ); p⁰ came from the cache
        calls.clear()
        assert close(again, Curvature(obj, params, moved, "ggn-base")(v, batch))
        assert len(calls) == 3  # without the cache: p⁰'s forward and the product's two
    finally:
        obj.outputs = outputs
    assert not BaseProbsCache.usable(AdapterParams(params.names + ("base_model.lm_head.modules_to_save.weight",),
                                                   params.shapes + (torch.Size([2, 2]),)))
