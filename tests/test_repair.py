"""First-order repair of `unlearn --verify until` (verify_repair = 'gradient', repair.py)."""

import math
from types import SimpleNamespace

import pytest
import torch

from llmeraser.data import request_from_rows
from llmeraser.errors import InputError
from llmeraser.settings import UnlearnSettings
from llmeraser.verify import Probe, judge


@pytest.fixture(scope="module")
def memorised(tmp_path_factory):
    """(folder, model, tokenizer, records): a LoRA adapter trained until greedy generation gives every answer."""
    from helpers import memorised_tiny

    root = tmp_path_factory.mktemp("memorised")
    model, tok, recs = memorised_tiny(root, 8, epochs=400, batch_size=8)
    return root, model, tok, recs


def _request(recs):
    return [{"op": "remove", "id": recs[0].id},
            {"op": "correct_response", "id": recs[1].id, "new": {"response": "0000"}}]


def test_repair_settings_are_checked():
    for bad in ({"verify_repair": "adam"}, {"repair_lr": 0.0}, {"repair_lr": float("inf")}, {"repair_steps": 0},
                {"repair_batch": 0}, {"repair_unlikelihood": -1.0}, {"repair_threshold": 1.0}, {"repair_threshold": True},
                {"repair_form": -0.5}, {"repair_form": float("nan")}):
        with pytest.raises(InputError, match=next(iter(bad))):
            UnlearnSettings(**bad)
    assert UnlearnSettings(verify_repair="gradient").verify_repair == "gradient"
    # a round has no reset and no pull weight: settings that only shape Newton extra steps are refused, not ignored
    for newton_only in ({"verify_reset": "parts"}, {"verify_pull": 40.0}):
        with pytest.raises(InputError, match="verify_repair 'newton'"):
            UnlearnSettings(reset_removed=10.0, verify_repair="gradient", **newton_only)
        assert UnlearnSettings(reset_removed=10.0, verify_repair="newton", **newton_only).verify_repair == "newton"
    # verify_restore needs a weight only in a Newton step; a round puts the uncertain kept records in its batches
    with pytest.raises(InputError, match="verify_restore"):
        UnlearnSettings(verify_restore=True)
    assert UnlearnSettings(verify_restore=True, verify_repair="gradient").verify_restore


def test_unlikelihood_against_a_loop_over_tokens(memorised):
    """Σ_{t ∈ mask, p_t > τ} −log(1 − p_t) and its token count, against p_t read off full forward passes of the
    model at each response position, for thresholds that keep all, some and none of the tokens."""
    from llmeraser.modeling import theta_of
    from llmeraser.objective import CausalLMObjective
    from llmeraser.render import encode
    from llmeraser.repair import unlikelihood

    _, model, tok, recs = memorised
    params, theta = theta_of(model)
    obj = CausalLMObjective(model, tok.pad_token_id)
    items = [encode(r, tok, "chat", 64) for r in recs[:3]]
    batch = obj.collate(items, "cpu")
    mask = torch.tensor([t % 2 == 0 for e in items for t in range(e.n_response)])
    probs = []
    with torch.no_grad():
        for e in items:
            logits = model(input_ids=torch.tensor([e.input_ids])).logits[0].double()
            for t in range(e.n_prompt, len(e.input_ids)):  # the logit at t − 1 predicts token t
                probs.append(float(torch.softmax(logits[t - 1], -1)[e.input_ids[t]]))
    assert len(probs) == len(mask)
    k = len(probs) // 2
    # τ halfway between two probabilities: no token sits at it within float32's rounding
    for tau in (0.0, (sorted(probs)[k] + sorted(probs)[k + 1]) / 2, 1 - 1e-9):
        on = [p for p, m in zip(probs, mask.tolist()) if m and p > tau]
        want = sum(-math.log1p(-p) for p in on)
        with torch.no_grad():
            value, count = unlikelihood(obj, params, theta, batch, mask, tau)
        assert count == len(on)
        assert float(value) == pytest.approx(want, rel=1e-4, abs=1e-6)


def test_a_repair_round_is_adam_with_clipping_as_torch_gives_it():
    """GradientRepair.round against torch.optim.Adam on the same gradients, clipped to norm 1 as in training:
    g(Θ) = A Θ − c, large enough that the clip acts on the first steps and not on the last."""
    from llmeraser.repair import GradientRepair

    torch.manual_seed(0)
    a = torch.diag(torch.tensor([3.0, 1.0, 0.2, 0.05]))
    c = torch.tensor([4.0, -2.0, 1.0, 0.5])
    rep = object.__new__(GradientRepair)
    rep.s = UnlearnSettings(repair_lr=0.05, repair_steps=7)
    rep.removed, rep.replaced, rep.kept, rep.new, rep.m1, rep.m2, rep.t = {}, {}, [], [], None, None, 0
    rep.gradient = lambda theta, pushed, restore: (a @ theta - c, 0)
    theta = torch.zeros(4)
    for _ in range(3):  # three rounds: Adam's moments carry over between them
        theta, record = rep.round(theta)
    x = torch.zeros(4, requires_grad=True)
    opt = torch.optim.Adam([x], lr=0.05)
    for _ in range(21):
        opt.zero_grad()
        x.grad = (a @ x.detach() - c)
        torch.nn.utils.clip_grad_norm_([x], 1.0)
        opt.step()
    assert torch.allclose(theta, x.detach(), atol=1e-6)
    assert record["optimizer_steps"] == 7 and record["adam_steps_total"] == 21


def test_repair_rounds_forget_a_removal_and_learn_a_correction(memorised):
    """From Θ̂ of the tiny memorised model: a few rounds (every kept record in each step, so that the outcome does
    not hang on which 4 of 6 a shuffle drew under a given thread count) leave the removed answer no longer produced,
    the corrected one produced and the sampled kept answers produced; the first round's unlikelihood had removed
    tokens above τ to push."""
    from llmeraser.modeling import theta_of
    from llmeraser.problem import Problem
    from llmeraser.repair import GradientRepair
    from llmeraser.verify import Verifier

    _, model, tok, recs = memorised
    req = request_from_rows(_request(recs), recs)
    params, theta_hat = theta_of(model)
    s = UnlearnSettings(max_length=64, template="chat", repair_lr=1e-2, repair_steps=10, repair_batch=6,
                        repair_unlikelihood=1.0, repair_threshold=0.1)
    problem = Problem(model, tok, recs, "chat", 64, 8)
    rep = GradientRepair(problem, req, s)
    verifier = Verifier(model, tok, params, theta_hat, recs, req, "chat", 64, 8, 6, 0)
    theta, checks, records = theta_hat.clone(), [], []
    for _ in range(6):
        theta, record = rep.round(theta)
        records.append(record)
        checks.append(verifier.check(theta))
        if checks[-1]["verified"]:
            break
    v = checks[-1]
    assert v["verified"], v["failures"]
    assert v["removed"]["still_produced"] == 0 and v["corrected"]["produced"] == 1
    assert records[0]["unlikelihood_tokens_first"] > 0
    assert torch.equal(theta_of(model)[1], theta_hat)  # the model's own weights are untouched


def test_until_with_the_gradient_repair_starts_from_the_original_when_it_misses_less(monkeypatch):
    """verify_edit with scripted checks: the update misses 3 (it lost retained answers), the original adapter 2, so the
    rounds start from Θ̂; the first round passes. unlearn.json says where the repair started."""
    from llmeraser import api

    probe_list = [Probe("a", "removed", None, ("t",)), Probe("b", "removed", None, ("t",))] + \
        [Probe(f"k{i}", "retained", None, ("t",)) for i in range(4)]
    before = [True] * 6
    after = {5.0: [False, False, True, False, False, False],  # the update: 3 of 4 retained answers lost
             0.0: [True, True, True, True, True, True],     # the original adapter: both removed answers produced
             1.0: [False, False, True, True, True, True]}   # after a round from Θ̂: verified
    starts = []

    class Scripted:
        def __init__(self, *args, **kwargs):
            pass

        def check(self, theta):
            return judge(probe_list, before, after[float(theta[0])])

    class Repair:
        def __init__(self, *args):
            pass

        def round(self, theta, restore=()):
            starts.append(float(theta[0]))
            return theta + 1, {"repair": "gradient"}

    monkeypatch.setattr(api, "Verifier", Scripted)
    monkeypatch.setattr(api, "GradientRepair", Repair)
    settings = UnlearnSettings(verify="until", verify_steps=3, verify_repair="gradient")
    problem = SimpleNamespace(params=None, theta_hat=torch.zeros(3), template="chat")
    unl = SimpleNamespace(settings=settings, problem=problem, refiner=None)
    theta, v, solve = api.verify_edit(unl, None, None, [], None, torch.full((3,), 5.0), progress=False)
    assert starts == [0.0] and float(theta[0]) == 1.0 and v["verified"] and solve is None
    assert v["repair_start"] == "original" and [r["shortfall"] for r in v["rounds"]] == [3, 2, 0]
    assert v["rounds"][1]["original_adapter"] and v["extra_steps"][0]["kept"]


def test_the_unlikelihood_lowers_the_removed_answers_tokens_beyond_what_the_kept_data_do(memorised):
    """One round from Θ̂ with w = 1 and one with w = 0, on the same kept batches (same seed): the removed answer's
    Σ_t −log(1 − p_t) ends lower with the unlikelihood, so the term, not the kept data alone, pushes it down."""
    from llmeraser.modeling import theta_of
    from llmeraser.problem import Problem
    from llmeraser.repair import GradientRepair, unlikelihood
    from llmeraser.reset import pulled_tokens

    _, model, tok, recs = memorised
    req = request_from_rows(_request(recs)[:1], recs)
    params, theta_hat = theta_of(model)
    problem = Problem(model, tok, recs, "chat", 64, 8)
    removed = [problem.examples[0]]
    batch = problem.objective.collate(removed, "cpu")
    ends = {}
    for w in (0.0, 1.0):
        s = UnlearnSettings(max_length=64, template="chat", repair_lr=1e-2, repair_steps=5, repair_batch=4,
                            repair_unlikelihood=w, repair_threshold=0.0)
        theta, _ = GradientRepair(problem, req, s).round(theta_hat.clone())
        with torch.no_grad():
            ends[w] = float(unlikelihood(problem.objective, params, theta, batch, pulled_tokens(removed, {}), 0.0)[0])
    with torch.no_grad():
        start = float(unlikelihood(problem.objective, params, theta_hat, batch, pulled_tokens(removed, {}), 0.0)[0])
    assert ends[1.0] < 0.5 * ends[0.0] and ends[1.0] < start


def test_restored_kept_records_join_every_step_of_a_round_and_the_shuffle_covers_the_rest(memorised):
    """The kept records handed to round() are in every step's kept batch (at most repair_batch of them); the shuffled
    batches meet every kept record once before any twice."""
    from llmeraser.modeling import theta_of
    from llmeraser.problem import Problem
    from llmeraser.repair import GradientRepair

    _, model, tok, recs = memorised
    req = request_from_rows(_request(recs), recs)
    problem = Problem(model, tok, recs, "chat", 64, 8)
    seen = []

    def grad_sum(items, theta, desc, progress):
        if desc == "repair: kept":
            seen.append([id(x) for x in items])
        return torch.zeros_like(theta)

    problem.grad_sum = grad_sum
    s = UnlearnSettings(max_length=64, template="chat", repair_steps=3, repair_batch=2, repair_unlikelihood=0.0)
    rep = GradientRepair(problem, req, s)
    kept = problem.sets(req).kept
    rep.round(theta_of(model)[1], [kept[4], kept[5], kept[0]])
    assert len(seen) == 3 and all(b[:2] == [id(kept[4]), id(kept[5])] and len(b) == 4 for b in seen)
    drawn = [i for b in seen for i in b[2:]]
    assert len(set(drawn)) == len(drawn) == 6 and set(drawn) == {id(x) for x in kept}


def test_unlearn_with_the_gradient_repair_verifies_where_the_update_cannot_move(memorised):
    """Through unlearn_model: λ = 1e6 leaves Θ̂ in place, so the check fails and the repair starts; its rounds (not
    Newton steps) reach a verified edit, and the report says where they started and what each round did. Every
    kept record is in each step, as in the test above, so that the outcome does not hang on the thread count."""
    from llmeraser.api import unlearn_model
    from llmeraser.modeling import theta_of

    _, model, tok, recs = memorised
    before = theta_of(model)[1]
    s = UnlearnSettings(damping=1e6, curvature_samples=0, max_length=64, template="chat", device="cpu", verify="until",
                        verify_retained=6, verify_steps=6, verify_repair="gradient", repair_lr=1e-2, repair_batch=6,
                        repair_unlikelihood=1.0)
    res = unlearn_model(model, tok, recs, _request(recs), weight_decay=0.0, settings=s)
    v, rep = res.report.verification, res.report
    assert res.verified, v["failures"]
    assert v["repair_start"] in ("update", "original") and v["rounds"][1].get("original_adapter")
    assert v["extra_steps"] and all(st["repair"] == "gradient" and st["optimizer_steps"] == 10 for st in v["extra_steps"])
    assert [st["step"] for st in rep.newton_steps] == list(range(1, len(v["extra_steps"]) + 2))
    assert torch.equal(theta_of(model)[1], before)


def _parts_request(recs):
    """recs[0] removed with its last two digits marked private, recs[2] removed with no marked part."""
    return [{"op": "remove", "id": recs[0].id, "private": [recs[0].sides()[1][2:]]}, {"op": "remove", "id": recs[2].id}]


def test_the_removed_terms_gradient_against_a_loop_over_records(memorised):
    """∇ of (w/|R|) Σ_r Σ_{t∈T_r, p_t>τ} −log(1 − p_t) + (v/|R_F|) Σ_{r∈R_F} (1/|F_r|) Σ_{t∈F_r} −log p_t, as
    GradientRepair batches it, against backward through one full forward pass per record of the model itself: the
    record without marked parts pushes every token and has no form term, the other pushes its part and keeps the rest."""
    from llmeraser.modeling import theta_of
    from llmeraser.problem import Problem
    from llmeraser.repair import GradientRepair

    _, model, tok, recs = memorised
    req = request_from_rows(_parts_request(recs), recs)
    params, theta_hat = theta_of(model)
    problem = Problem(model, tok, recs, "chat", 64, 8)
    w, v = 0.7, 1.3
    s = UnlearnSettings(max_length=64, template="chat", repair_unlikelihood=w, repair_form=v, repair_threshold=0.0)
    rep = GradientRepair(problem, req, s)
    got, tokens = rep._removed_grad(theta_hat, list(rep.removed.values()))

    named = dict(model.named_parameters())
    for n in params.names:
        named[n].grad = None
    total, pushed = 0.0, 0
    for rid, private in ((recs[0].id, [recs[0].sides()[1][2:]]), (recs[2].id, None)):
        e, at = rep.removed[rid]
        private_at = set(range(e.n_response)) if private is None else set(problem.part_positions(recs[0], private))
        assert (at is None) == (private is None) and 0 < len(private_at) <= e.n_response
        logits = model(input_ids=torch.tensor([e.input_ids])).logits[0].double()
        # the logit at position t − 1 predicts token t; response token k sits at n_prompt + k
        logp = torch.stack([torch.log_softmax(logits[e.n_prompt + k - 1], -1)[e.input_ids[e.n_prompt + k]]
                            for k in range(e.n_response)])
        ul = sum(-torch.log1p(-logp[k].exp().clamp(max=1 - 1e-6)) for k in private_at)
        pushed += len(private_at)
        total = total + w * ul / 2
        free = [k for k in range(e.n_response) if k not in private_at]
        if private is not None:
            assert free
            total = total + v * (-logp[free].sum() / len(free)) / 1  # one removed record has marked parts
    total.backward()
    want = params.flatten({n: named[n].grad for n in params.names}).float()
    for n in params.names:
        named[n].grad = None
    assert tokens == pushed
    # float32 batched passes against float64 log-softmax of one pass per record: agree to ~2e-4 of the norm; a wrong
    # weight or normaliser (|R| for |R_F|, a sum for the mean over F_r) is off by tens of percent
    assert float((got - want).norm()) <= 1e-3 * float(want.norm())


def test_the_form_term_keeps_the_removed_answers_other_words(memorised):
    """One round from Θ̂ with v = 1 and one with v = 0 (same seed, so the same kept batches), both pushing the private
    digits out: with the form term the NLL of the removed answer's unmarked tokens ends lower, and the term leaves
    the pushed digits no more likely than without it."""
    from llmeraser.modeling import theta_of
    from llmeraser.problem import Problem
    from llmeraser.repair import GradientRepair, form_weights, target_logp

    _, model, tok, recs = memorised
    req = request_from_rows(_parts_request(recs)[:1], recs)
    params, theta_hat = theta_of(model)
    problem = Problem(model, tok, recs, "chat", 64, 8)
    e = problem.examples[0]
    at = problem.part_positions(recs[0], [recs[0].sides()[1][2:]])
    batch = problem.objective.collate([e], "cpu")
    weights = form_weights([e], {id(e): at})
    ends = {}
    for v in (0.0, 1.0):
        s = UnlearnSettings(max_length=64, template="chat", repair_lr=1e-2, repair_steps=8, repair_batch=4,
                            repair_unlikelihood=1.0, repair_threshold=0.0, repair_form=v)
        theta, record = GradientRepair(problem, req, s).round(theta_hat.clone())
        assert record["form_weight"] == v
        with torch.no_grad():
            logp = target_logp(problem.objective, params, theta, batch)
        ends[v] = (float(-(weights * logp).sum()), float(logp[at].exp().max()))
    assert abs(float(weights.sum()) - 1) < 1e-6 and float(weights[at].abs().sum()) == 0
    assert ends[1.0][0] < ends[0.0][0]
    assert ends[1.0][1] <= ends[0.0][1] + 0.05


def _old_request(recs):
    """recs[0] removed, its last two digits marked private; recs[1]'s answer corrected to one that keeps its first two
    digits, its whole old answer marked private: the replaced value starts at the third digit."""
    old = recs[1].sides()[1]
    return [{"op": "remove", "id": recs[0].id, "private": [recs[0].sides()[1][2:]]},
            {"op": "correct_response", "id": recs[1].id, "private": [old],
             "new": {"response": old[:2] + ("11" if old[2] == "0" else "00")}}]


def test_repair_old_pushes_a_corrections_old_value_from_where_the_answers_differ(memorised):
    """With repair_old, GradientRepair's pushed records add the correction's old record at its private tokens from the
    first that differs from the new answer (here the third and fourth digits), and the removed terms' gradient is ∇ of
    (w/|R|) Σ_{r ∈ removed ∪ replaced} Σ_{t∈T_r} −log(1 − p_t) + (v/|R_F|) Σ_{removed r} form_r (no form term for the
    old record) against one full forward pass per record; above() counts its tokens too. Without it, nothing of the
    correction is pushed or counted."""
    from llmeraser.modeling import theta_of
    from llmeraser.problem import Problem
    from llmeraser.repair import GradientRepair

    _, model, tok, recs = memorised
    req = request_from_rows(_old_request(recs), recs)
    params, theta_hat = theta_of(model)
    problem = Problem(model, tok, recs, "chat", 64, 8)
    w, v = 0.7, 1.3
    base = dict(max_length=64, template="chat", verify_repair="gradient", repair_unlikelihood=w, repair_form=v,
                repair_threshold=0.0)
    plain, rep = (GradientRepair(problem, req, UnlearnSettings(**base, repair_old=on)) for on in (False, True))
    assert plain.replaced == {} and list(plain.pushed()) == [recs[0].id]
    x, at = rep.replaced[recs[1].id]
    assert x is problem.examples[1] and at == [2, 3]
    got, tokens = rep._removed_grad(theta_hat, list(rep.pushed().values()))

    named = dict(model.named_parameters())
    for n in params.names:
        named[n].grad = None
    total, pushed, probs = 0.0, 0, []
    for rid, form in ((recs[0].id, True), (recs[1].id, False)):
        e, private_at = rep.pushed()[rid]
        logits = model(input_ids=torch.tensor([e.input_ids])).logits[0].double()
        logp = torch.stack([torch.log_softmax(logits[e.n_prompt + k - 1], -1)[e.input_ids[e.n_prompt + k]]
                            for k in range(e.n_response)])
        total = total + w * sum(-torch.log1p(-logp[k].exp().clamp(max=1 - 1e-6)) for k in private_at) / 2
        pushed += len(private_at)
        probs += [float(logp[k].detach().exp()) for k in private_at]
        if form:  # the one removed record with marked parts
            free = [k for k in range(e.n_response) if k not in private_at]
            total = total + v * (-logp[free].sum() / len(free))
    total.backward()
    want = params.flatten({n: named[n].grad for n in params.names}).float()
    for n in params.names:
        named[n].grad = None
    assert tokens == pushed == 4
    # as in the removed terms' test: a wrong normaliser or a form term on the old record is off by tens of percent
    assert float((got - want).norm()) <= 1e-3 * float(want.norm())
    # above(Θ̂, m) at floors τ: the replaced tokens count as the removed ones do
    checks = [GradientRepair(problem, req, UnlearnSettings(**{**base, "repair_threshold": 0.05}, repair_old=on))
              for on in (False, True)]
    assert checks[1].above(theta_hat, 1.0) == sum(q > 0.05 for q in probs) > checks[0].above(theta_hat, 1.0)


def test_repair_old_under_capped_keeps_the_tokens_the_kept_records_do_not_predict(memorised):
    """reset_target 'capped': a correction's pushed tokens are its support.capped_positions from where the answers
    differ, so a token the kept records predict, or one the new answer shares, is never pushed."""
    from llmeraser.problem import Problem
    from llmeraser.repair import GradientRepair
    from llmeraser.support import KeptContinuations, capped_positions

    _, model, tok, recs = memorised
    req = request_from_rows(_old_request(recs), recs)
    problem = Problem(model, tok, recs, "chat", 64, 8)
    s = UnlearnSettings(max_length=64, template="chat", verify_repair="gradient", reset_target="capped", repair_old=True)
    x, at = GradientRepair(problem, req, s).replaced[recs[1].id]
    # by the kept records' table itself: of the old answer's third and fourth digits, those it does not predict
    table = KeptContinuations(problem.sets(req).kept, tok)
    want = [k for k in table.unsupported(x, problem.part_positions(recs[1], [recs[1].sides()[1]])) if k >= 2]
    assert at and at == want and set(at) <= {2, 3}
    assert at == sorted(k for k in capped_positions(problem, req)[recs[1].id] if k >= 2)


def test_a_round_with_repair_old_lowers_the_old_value(memorised):
    """One round from Θ̂ with repair_old and one without (same seed, same kept batches): with it the old value's pushed
    tokens end less likely, while the corrected answer's NLL stays within 0.1 nats of the round without it."""
    from llmeraser.modeling import theta_of
    from llmeraser.problem import Problem
    from llmeraser.repair import GradientRepair, target_logp

    _, model, tok, recs = memorised
    req = request_from_rows(_old_request(recs), recs)
    params, theta_hat = theta_of(model)
    problem = Problem(model, tok, recs, "chat", 64, 8)
    old, new = problem.examples[1], problem.sets(req).new[0]
    ends = {}
    for on in (False, True):
        s = UnlearnSettings(max_length=64, template="chat", verify_repair="gradient", repair_lr=1e-2, repair_steps=5,
                            repair_batch=4, repair_threshold=0.0, repair_old=on)
        theta, record = GradientRepair(problem, req, s).round(theta_hat.clone())
        assert record["replaced_values"] == int(on)
        with torch.no_grad():
            p_old = target_logp(problem.objective, params, theta, problem.objective.collate([old], "cpu"))[2:4].exp()
            nll_new = -float(target_logp(problem.objective, params, theta, problem.objective.collate([new], "cpu")).sum())
        ends[on] = (float(p_old.prod()), nll_new)
    assert ends[True][0] < 0.75 * ends[False][0]  # measured 0.60 of it; equal were the old value not pushed
    assert ends[True][1] <= ends[False][1] + 0.1


def test_repair_old_needs_the_gradient_rounds_and_a_recipe_drops_it_for_newton_steps():
    from llmeraser.recipes import recipe, resolve

    with pytest.raises(InputError, match="repair_old"):
        UnlearnSettings(repair_old=True)
    with pytest.raises(InputError, match="repair_old"):
        UnlearnSettings(repair_old="yes", verify_repair="gradient")
    assert UnlearnSettings(repair_old=True, verify_repair="gradient").repair_old
    from llmeraser.recipes import _capped_check_follows

    # a recipe's own repair_old turns off where the user picks Newton extra steps, unless asked for as well
    for given, kept in (({"verify_repair": "newton"}, False), ({"verify_repair": "newton", "repair_old": True}, True),
                        ({"repair_lr": 1e-3}, True)):
        merged = {"verify_repair": "gradient", "repair_old": True, **given}
        _capped_check_follows(merged, given)
        assert merged["repair_old"] is kept, given
    with pytest.raises(InputError, match="repair_old"):
        resolve("memorised", None, {"verify_repair": "newton", "repair_old": True})
    assert recipe("memorised").repair_old and not recipe("default").repair_old
    assert not resolve("memorised", None, {"verify_repair": "newton"})[1].repair_old
