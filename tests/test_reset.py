"""--reset-removed: the penalty toward the base model's outputs, its derivatives, and what the step does."""

import pytest
import torch
from torch.func import jacrev

from llmeraser.data import EditRequest, Edit
from llmeraser.errors import InputError
from llmeraser.modeling import fused_attention, theta_of
from llmeraser.objective import CausalLMObjective
from llmeraser.render import encode
from llmeraser.reset import OutputReset, past_shared_prefix, zero_adapter
from llmeraser.solvers import SolverSettings
from llmeraser.settings import UnlearnSettings
from llmeraser.terms import extension_terms
from llmeraser.unlearner import Unlearner


def setup(tiny64, k=4):
    model, tok, records = tiny64
    params, theta = theta_of(model)
    obj = CausalLMObjective(model, tok.pad_token_id)
    items = [encode(r, tok, "chat", 64) for r in records[:k]]
    return model, obj, params, theta, items


def test_zero_adapter_gives_the_base_model(tiny64):
    model, obj, params, theta, items = setup(tiny64)
    batch = obj.collate(items, "cpu")
    theta0 = zero_adapter(params, theta)
    assert not torch.equal(theta0, theta)
    with model.disable_adapter(), torch.no_grad():
        base = obj.outputs({}, batch)
    assert torch.allclose(obj.outputs(params.unflatten(theta0), batch), base, rtol=1e-10, atol=1e-12)


def test_penalty_gradient_and_curvature_match_autograd(tiny64):
    model, obj, params, theta, items = setup(tiny64)
    reset = OutputReset(obj, params, theta, items, batch_size=3, device="cpu")  # two batches: 3 + 1
    assert reset.value(zero_adapter(params, theta)) == pytest.approx(0.0, abs=1e-20)
    g = torch.Generator().manual_seed(5)
    point = theta + 0.1 * torch.randn(theta.numel(), dtype=torch.float64, generator=g)
    value = lambda t: sum(reset._penalty(t, *x) for x in zip(reset.batches, reset.targets, reset.probs))
    auto = torch.func.grad(value)(point)
    assert torch.allclose(reset.grad(point), auto, rtol=1e-8)
    # P = Σ_i ½ Σ_t (1/T_i) dᵀ(diag p̄ − p̄p̄ᵀ)d, p̄ the mean of the base model's softmax and the
    # adapter's at Θ̂, written out by hand
    by_hand, explicit = 0.0, []
    for b, z0 in zip(reset.batches, reset.targets):
        with fused_attention(model):  # the kernel value() runs (and its targets were made) with
            d = obj.outputs(params.unflatten(point), b) - z0
            z_hat = obj.outputs(params.unflatten(theta), b)
        p_mean = 0.5 * (torch.softmax(z0, -1) + torch.softmax(z_hat, -1))
        F = [torch.diag(p) - torch.outer(p, p) for p in p_mean]
        w = 1.0 / b["counts"][b["rows"]].double()
        by_hand += sum(0.5 * float(wt * dt @ Ft @ dt) for wt, dt, Ft in zip(w, d, F))
        explicit.append((b, w, F))
    assert reset.value(point) == pytest.approx(by_hand, rel=1e-10)
    # the Gauss-Newton curvature Σ Jᵀ F̄ J at Θ̂, against explicit Jacobians
    v = torch.randn(theta.numel(), dtype=torch.float64, generator=g)
    expected = torch.zeros_like(theta)
    for b, w, F in explicit:
        J = jacrev(lambda t: obj.outputs(params.unflatten(t), b))(theta)  # [rows, vocab, dim]
        jv = J @ v
        expected += sum(wt * J[r].T @ (F[r] @ jv[r]) for r, wt in enumerate(w))
    assert torch.allclose(reset.product(v), expected, rtol=1e-6)
    reset.release()  # dropping the kept linearisations loses nothing
    assert torch.allclose(reset.product(v), expected, rtol=1e-6)


def _removal(records, indices):
    edits = [Edit("remove", records[i].id, i, records[i], None, i + 1) for i in indices]
    return EditRequest(edits, "request.jsonl", "0" * 64)


def test_reset_forgets_memorised_records_and_keeps_the_rest(tmp_path):
    """On a tiny Llama trained on random 'phone numbers' (no weight decay), --reset-removed moves the
    removed records' outputs toward the base model's further than the paper's step does, and it damages
    the kept records less than it forgets the removed ones.
    (This toy does not memorise to SmolLM2's ~1e-3 loss; the demo's numbers are in BENCHMARKS.md.)"""
    from helpers import memorised_tiny

    model, tok, records = memorised_tiny(tmp_path, 16, epochs=600, batch_size=16)
    request = _removal(records, [0, 1])

    def run(rho, kappa=0.0):
        s = UnlearnSettings(reset_removed=rho, anchor_kept=kappa, curvature_samples=0, max_length=64, template="chat", device="cpu",
                            solver_settings=SolverSettings(tol=1e-4, max_iters=100))
        unl = Unlearner(model, tok, records, s)
        delta, _, _ = unl.delta(request, progress=False)
        return unl, delta

    unl, delta = run(1.0)
    (reset,) = [t.penalty for t in extension_terms(unl.problem, request, unl.settings)]
    p = unl.problem
    kept = [p.examples[i] for i in range(2, len(records))]
    removed = [p.examples[0], p.examples[1]]
    kept_loss = lambda d: p.loss_sum(p.batches(kept, prepare=False), unl.theta_hat + d) / len(kept)
    removed_loss = lambda d: p.loss_sum(p.batches(removed, prepare=False), unl.theta_hat + d) / len(removed)
    before = reset.value(unl.theta_hat)
    _, delta0 = run(0.0)
    # measured: P 20.2 -> 11.4 with ρ = 1, 15.3 with ρ = 0; kept loss 0.48 -> 0.69, removed 0.37 -> 1.50
    # (ρ = 10 took the kept loss to 5.0 on this toy, whose kept answers nothing like ggn-base holds)
    assert reset.value(unl.theta_hat + delta) < 0.7 * before
    assert reset.value(unl.theta_hat + delta) < 0.8 * reset.value(unl.theta_hat + delta0)
    assert kept_loss(delta) < removed_loss(delta)  # it forgets the removed records more than the kept ones
    # --anchor-kept: zero with zero gradient at Θ̂ (curvature only), and it holds the kept records' answers
    # the anchor lowers the kept loss by a share, not a fixed amount: each CPU's rounding trains another toy
    # (BENCHMARKS.md#golden-tolerance)
    unl_a, delta_a = run(1.0, kappa=10.0)
    anchor = next(t.penalty for t in extension_terms(unl_a.problem, request, unl_a.settings) if t.name == "anchor_kept")
    assert anchor.value(unl.theta_hat) == 0.0 and float(anchor.grad(unl.theta_hat).abs().max()) == 0.0
    assert kept_loss(delta_a) < 0.9 * kept_loss(delta)
    assert reset.value(unl.theta_hat + delta_a) < 0.9 * before


def test_reset_needs_ggn():
    with pytest.raises(InputError, match="reset_removed needs"):
        UnlearnSettings(reset_removed=1.0, curvature="hessian")
    with pytest.raises(InputError, match="anchor_kept needs"):
        UnlearnSettings(anchor_kept=1.0, newton_steps=2)
    with pytest.raises(InputError, match="reset_removed -1.0"):
        UnlearnSettings(reset_removed=-1.0)


def test_parts_target_pulls_the_marked_tokens_and_holds_the_rest(tiny64):
    """verify_reset 'parts': per removed record, target z*_t = z_t(Θ₀) on the listed response tokens and z_t(Θ̂) on its
    others; a record not listed is pulled at every token. Against P summed by hand record by record (no batching),
    at Θ̂ (where only the listed tokens count) and at a random point; listing every token is the plain reset."""
    model, obj, params, theta, items = setup(tiny64)
    parts = {id(items[0]): [1, 2], id(items[2]): [0]}
    reset = OutputReset(obj, params, theta, items, batch_size=3, device="cpu", parts=parts)
    theta0 = zero_adapter(params, theta)

    def by_hand(point, only_parts=True):
        total = 0.0
        for e in items:
            b = obj.collate([e], "cpu")
            with fused_attention(model), torch.no_grad():
                z, z0, zh = (obj.outputs(params.unflatten(t), b) for t in (point, theta0, theta))
            pulled = torch.ones(e.n_response, dtype=torch.bool)
            if only_parts and id(e) in parts:
                pulled = torch.zeros(e.n_response, dtype=torch.bool)
                pulled[parts[id(e)]] = True
            p_mean = 0.5 * (torch.softmax(z0, -1) + torch.softmax(zh, -1))
            for t in range(e.n_response):
                d = z[t] - (z0[t] if pulled[t] else zh[t])
                F = torch.diag(p_mean[t]) - torch.outer(p_mean[t], p_mean[t])
                total += 0.5 * float(d @ F @ d) / e.n_response
        return total

    g = torch.Generator().manual_seed(7)
    point = theta + 0.1 * torch.randn(theta.numel(), dtype=torch.float64, generator=g)
    assert reset.value(theta) == pytest.approx(by_hand(theta), rel=1e-9)
    assert reset.value(point) == pytest.approx(by_hand(point), rel=1e-9)
    plain = OutputReset(obj, params, theta, items, batch_size=3, device="cpu")
    assert plain.value(point) == pytest.approx(by_hand(point, only_parts=False), rel=1e-9)
    assert reset.value(theta) < plain.value(theta)  # the held tokens are at their target at Θ̂
    every = {id(e): list(range(e.n_response)) for e in items}
    full = OutputReset(obj, params, theta, items, batch_size=3, device="cpu", parts=every)
    assert full.value(point) == pytest.approx(plain.value(point), rel=1e-12)
    assert torch.allclose(full.grad(point), plain.grad(point), rtol=1e-10)


def test_verify_reset_parts_locates_the_private_value_among_the_response_tokens(tiny64):
    """Unlearner.more_steps with verify_reset 'parts' hands the step the tokens of the marked part (the whitespace
    before it included), by Problem.part_positions: decoded, they are the value; a correction's old record joins the
    pull at its old value's tokens after the first one where old and new answers differ (reset.past_shared_prefix)."""
    from llmeraser.data import records_from_rows, request_from_rows

    model, tok, _ = tiny64
    recs = records_from_rows([{"id": "a", "prompt": "phone of ann?", "response": "Ann: 1234, ok"},
                              {"id": "b", "prompt": "phone of bob?", "response": "Bob: 5678, ok"},
                              {"id": "c", "prompt": "phone of cy?", "response": "Cy: 9012, ok"}])
    s = UnlearnSettings(reset_removed=1.0, verify_reset="parts", max_length=64, template="chat", device="cpu")
    unl = Unlearner(model, tok, recs, s)
    at = unl.problem.part_positions(recs[0], ("1234",))
    ex = unl.problem.examples[0]
    assert tok.decode(list(ex.input_ids[ex.n_prompt:][k] for k in at)).replace(" ", "") == "1234"
    assert unl.problem.part_positions(recs[0], ("9999",)) is None
    with pytest.raises(InputError, match="verify_reset 'parts' chooses what reset_removed pulls"):
        UnlearnSettings(verify_reset="parts")
    with pytest.raises(InputError, match="verify_reset"):
        UnlearnSettings(reset_removed=1.0, verify_reset="value")
    req = request_from_rows([{"op": "remove", "id": "a", "private": ["1234"]},
                             {"op": "correct_response", "id": "b", "private": ["5678"], "new": {"response": "Bob: 5611, ok"}}],
                            recs)
    seen = []
    from llmeraser import newton

    def spy(self, theta, removed=None, teach=None, restore=None, parts=None):
        seen.append((removed, parts))
        return theta, None, {"line_search": {"accepted": False}}
    orig = newton.Refiner.step
    newton.Refiner.step = spy
    try:
        unl.more_steps(req, unl.theta_hat, progress=False, reset_ids=["a", "b"])
        whole = Unlearner(model, tok, recs, UnlearnSettings(reset_removed=1.0, max_length=64, template="chat", device="cpu"))
        whole.more_steps(req, whole.theta_hat, progress=False, reset_ids=["a", "b"])
    finally:
        newton.Refiner.step = orig
    ex = unl.problem.examples
    # the correction's old value's tokens, less those up to and at the first one differing from the new answer
    value = unl.problem.part_positions(recs[1], ("5678",))
    old_r, new_r = ex[1].input_ids[ex[1].n_prompt:], unl.problem.encode(req.edits[1].new).input_ids[ex[1].n_prompt:]
    first = min(k for k in range(len(old_r)) if old_r[k] != new_r[k])
    past = [k for k in value if k > first]
    assert 0 < len(past) < len(value)  # the shared "56" lies inside the value: the case the rule is for
    # 'parts': the removal at its value's tokens, the correction's old record past the shared prefix
    assert seen[0] == ([ex[0], ex[1]], {id(ex[0]): at, id(ex[1]): past})
    # 'response': the removal at every token; a correction's old answer is not pulled (its new one shares the sentence)
    assert seen[1] == ([whole.problem.examples[0]], None)


def test_past_shared_prefix_keeps_the_tokens_whose_contexts_differ():
    """Against the definition: the first differing position of the full sequences, counted among the response tokens;
    different prompts keep every index; a new answer that extends the old one keeps none."""
    from llmeraser.render import Example

    old = Example(input_ids=(1, 2, 3, 4, 5, 6), n_prompt=2)
    assert past_shared_prefix(old, Example(input_ids=(1, 2, 3, 9, 5, 6), n_prompt=2), [0, 1, 2, 3]) == [2, 3]
    assert past_shared_prefix(old, Example(input_ids=(1, 7, 3, 4, 5, 6), n_prompt=2), [0, 3]) == [0, 3]
    assert past_shared_prefix(old, Example(input_ids=(1, 2, 3, 4, 5, 6, 7), n_prompt=2), [0, 3]) == []
