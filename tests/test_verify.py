"""Verification by greedy generation (verify.py) and `unlearn --verify until`."""

import json

import pytest
import torch

from llmeraser.data import load_records, request_from_rows
from llmeraser.errors import NOT_VERIFIED_EXIT, InputError
from llmeraser.settings import UnlearnSettings
from llmeraser.verify import Z95, Probe, judge, probes, produced, shortfall, summary_line, wilson

ROWS = [{"id": "a", "prompt": "phone of ann?", "response": "Ann: 1234, ann@x.org"},
        {"id": "b", "prompt": "phone of bob?", "response": "Yes."},
        {"id": "c", "prompt": "phone of cy?", "response": "Yes."},
        {"id": "d", "prompt": "phone of dee?", "response": "5678"},
        {"id": "e", "prompt": "phone of eve?", "response": "9012"}]


def records():
    from llmeraser.data import records_from_rows

    return records_from_rows(ROWS)


def test_produced_ignores_case_and_spacing():
    assert produced("  the ANSWER is\n1234 .", ("answer is 1234",))
    assert produced("the answer is 12 34", ("1234",))  # spaced digits give the number away all the same
    assert not produced("the answer is 1243", ("1234",))
    assert produced("x", ("zz", "x"))  # any target


def test_probes_of_each_edit_kind():
    recs = records()
    req = request_from_rows([{"op": "remove", "id": "a", "private": ["ann@x.org"]},
                             {"op": "remove", "id": "b"},
                             {"op": "correct_response", "id": "d", "new": {"response": "5679"}},
                             {"op": "modify_query", "id": "e", "new": {"prompt": "phone of EVE?"}}], recs)
    got = {(p.id, p.kind): p for p in probes(req, recs, retained=5, seed=0)}
    assert got["a", "removed"].targets == ("ann@x.org",) and not got["a", "removed"].shared
    assert got["b", "removed"].shared  # "Yes." is also kept record c's answer: retraining gives it too
    assert got["d", "new"].targets == ("5679",) and got["d", "old"].targets == ("5678",)
    assert got["e", "query"].targets == ("9012",) and got["e", "query"].ask.fields["prompt"] == "phone of EVE?"
    assert ("e", "old") not in got  # nothing of the old query is marked private
    assert [p.id for p in probes(req, recs, 5, 0) if p.kind == "retained"] == ["c"]  # the only kept record
    req = request_from_rows([{"op": "modify_query", "id": "e", "private": ["eve"], "new": {"prompt": "phone of X?"}}], recs)
    assert {(p.kind, p.targets) for p in probes(req, recs, 0, 0)} == {("query", ("9012",)), ("old", ("eve",))}


def test_private_must_be_what_the_edit_takes_away():
    recs = records()
    with pytest.raises(InputError, match="'private' 'bob@x.org' does not occur in the response of record 'a'"):
        request_from_rows([{"op": "remove", "id": "a", "private": ["bob@x.org"]}], recs)
    with pytest.raises(InputError, match="'private' 'ann' does not occur in the response"):  # the prompt's name
        request_from_rows([{"op": "remove", "id": "d", "private": ["ann"]}], recs)
    with pytest.raises(InputError, match="'private' must be a non-empty list"):
        request_from_rows([{"op": "remove", "id": "a", "private": "ann@x.org"}], recs)
    # a modified query's private part is in its old prompt, not in the answer it must still give
    with pytest.raises(InputError, match="must occur in the old prompt of record 'a' and not in its response"):
        request_from_rows([{"op": "modify_query", "id": "a", "private": ["ann"], "new": {"prompt": "phone?"}}], recs)


def test_judge_counts_and_verdict():
    P = lambda kind, shared=False: Probe("x", kind, None, ("t",), shared)
    probe_list = [P("removed"), P("removed", shared=True), P("new"), P("old"), P("query"), P("old", shared=True),
                  *[P("retained") for _ in range(20)]]
    # removed: produced before and after; shared removed: ignored; new: absent; old: absent; query: produced;
    # retained: 19 produced before, 18 of them after (18/19 = 0.947 < 0.95), 1 never produced
    before = [True, True, False, True, True, True] + [True] * 19 + [False]
    after = [True, True, False, False, True, True] + [True] * 18 + [False, True]
    v = judge(probe_list, before, after)
    assert v["removed"] == {"checked": 1, "unchecked": 1, "produced_before": 1, "still_produced": 1,
                            "still_produced_common": 0}
    assert v["corrected"] == {"checked": 1, "produced": 0, "produced_before": 0}
    assert v["queries"] == {"checked": 1, "produced": 1, "produced_before": 1}
    assert v["old"] == {"checked": 1, "unchecked": 1, "produced_before": 1, "still_produced": 0,
                        "still_produced_common": 0}
    assert v["retained"] == {"sampled": 20, "produced_before": 19, "kept": 18, "kept_share": 18 / 19,
                             "kept_interval": list(wilson(18, 19))}
    assert not v["verified"]
    assert v["failures"] == ["1 of 1 removed answers still produced", "1 of 1 corrections not produced",
                             "18 of 19 sampled retained answers kept (< 95%)"]
    assert "retained kept 18/19 of 20 sampled (over every kept record, 95% interval 75%–99%)" in summary_line(v)
    # verify_capped's count shows in the line when the check made it (a NOT verified line must say what failed)
    assert "capped tokens" not in summary_line(v)
    assert summary_line({**v, "capped_above": 3, "capped_bound": 0.04}).endswith(
        "capped tokens of removed values above p = 0.04: 3")
    good = judge(probe_list, before, [False, True, True, False, True, True] + [True] * 19 + [False])
    assert good["verified"] and good["failures"] == []
    # the shortfall in records: 1 removed + 1 correction + 1 retained answer beyond the 5% allowed (18 < 19 of 19)
    assert shortfall(v) == 3 and shortfall(good) == 0
    lost_query = judge(probe_list, before, [False, True, True, True, False, True] + [True] * 19 + [False])
    assert lost_query["failures"] == ["1 of 1 replaced answers or private parts still produced",
                                      "1 of 1 answers to modified queries not produced"] and shortfall(lost_query) == 2


def test_wilson_interval_ends_solve_the_score_equation_and_cover_the_share():
    """Each end p of wilson(k, m) solves (k/m − p)² = z²·p(1 − p)/m (clipped to [0, 1]), found here as the roots
    of that quadratic by numpy; k/m lies inside; k = m still gives a width > 0; m = 0 gives (0, 1)."""
    import numpy as np

    for k, m in [(61, 64), (45, 48), (18, 19), (64, 64), (0, 7), (3, 10)]:
        q, z2 = k / m, Z95 ** 2
        # (1 + z²/m)·p² − (2q + z²/m)·p + q² = 0
        roots = sorted(np.roots([1 + z2 / m, -(2 * q + z2 / m), q * q]).real)
        lo, hi = wilson(k, m)
        assert lo == pytest.approx(max(0.0, roots[0]), abs=1e-9) and hi == pytest.approx(min(1.0, roots[1]), abs=1e-9)
        assert lo <= q <= hi and hi - lo > 0
    assert wilson(61, 64) == pytest.approx((0.8710, 0.9839), abs=1e-4)
    assert wilson(0, 0) == (0.0, 1.0)


def test_a_removed_value_kept_records_also_hold_is_checked_and_counted_apart():
    """A removed record's private value that a kept answer also holds ('1234' in d's answer below) stays checked and
    fails the check when produced, and the failure says it may be retraining's chance; an own value does not."""
    rows = ROWS[:3] + [{"id": "d", "prompt": "code of dee?", "response": "code 12 34"},
                       {"id": "e", "prompt": "mail of eve?", "response": "eve@x.org"}]
    from llmeraser.data import records_from_rows

    recs = records_from_rows(rows)
    req = request_from_rows([{"op": "remove", "id": "a", "private": ["1234"]},
                             {"op": "correct_response", "id": "e", "private": ["eve@x.org"],
                              "new": {"response": "eve@y.org"}}], recs)
    got = {(p.id, p.kind): p for p in probes(req, recs, retained=5, seed=0)}
    assert got["a", "removed"].common and not got["a", "removed"].shared
    assert not got["e", "old"].common and not got["e", "new"].common
    probe_list = list(got.values())
    before = [True] * len(probe_list)
    after = [p.kind in ("removed", "new", "retained") for p in probe_list]
    v = judge(probe_list, before, after)
    assert not v["verified"] and v["removed"]["still_produced"] == 1 and v["removed"]["still_produced_common"] == 1
    assert v["failures"] == ["1 of 1 removed answers still produced (1 of them a value kept records also hold, "
                             "which retraining may give by chance)"]
    assert [r["common"] for r in v["records"] if r["kind"] == "removed"] == [True]
    assert "removed answers still produced 1/1 (1 a value kept records also hold)" in summary_line(v)


def test_a_marked_value_given_in_another_prompts_answer_is_a_leak():
    """A removed or replaced 'private' part absent from its own answer but given in another asked prompt's answer is
    leaked, and fails the check; not where that prompt's own responses hold it, not for a common value (another
    person's answer may give it by chance), not for an unmarked old answer."""
    from llmeraser.data import records_from_rows
    from llmeraser.verify import leaks, own_responses

    rows = [{"id": "a", "prompt": "mail of ann?", "response": "ann@x.org"},
            {"id": "a2", "prompt": "illness of ann?", "response": "Ann has flu"},
            {"id": "b", "prompt": "mail of bob?", "response": "bob@x.org"},
            {"id": "c", "prompt": "illness of cy?", "response": "Cy has flu"},
            {"id": "e", "prompt": "mail of eve?", "response": "eve@x.org"},
            {"id": "g", "prompt": "mail of gil?", "response": "gil, or ann@x.org"},
            {"id": "h", "prompt": "code of hal?", "response": "4321"}]
    recs = records_from_rows(rows)
    req = request_from_rows([{"op": "remove", "id": "a", "private": ["ann@x.org"]},
                             {"op": "remove", "id": "a2", "private": ["flu"]},  # c's answer holds it too: common
                             {"op": "remove", "id": "h"},  # unmarked: its whole answer is the target
                             {"op": "correct_response", "id": "e", "private": ["eve@x.org"], "new": {"response": "eve@y.org"}},
                             {"op": "correct_response", "id": "g", "private": ["gil"], "new": {"response": "gl@z.org"}}], recs)
    probe_list = probes(req, recs, retained=5, seed=0)
    prompts = list(dict.fromkeys(p.ask.fields["prompt"] for p in probe_list))  # one answer per distinct prompt
    index = [prompts.index(p.ask.fields["prompt"]) for p in probe_list]
    answers = {"mail of ann?": "I cannot say.",
               "illness of ann?": "Ann's mail is ann@x.org",  # a's removed value, in a2's answer: leaked
               # e's replaced value: leaked; h's unmarked answer and a2's common 'flu': not searched
               "mail of bob?": "bob@x.org, eve@x.org, 4321, flu",
               "illness of cy?": "Cy has flu",
               "mail of eve?": "eve@y.org",
               "mail of gil?": "gil, or ann@x.org"}  # g's own old answer: ann@x.org there is not a leak of a's
    answers = [answers.get(q, "") for q in prompts]
    got = leaks(probe_list, index, answers, own_responses(probe_list, index, len(prompts), req))
    leaked = {(p.id, p.kind) for p, x in zip(probe_list, got) if x}
    assert leaked == {("a", "removed"), ("e", "old")}
    # with a2 answering otherwise, ann@x.org is left only in g's answer, whose own old response holds it: no leak,
    # though there would be one if g's own responses were not consulted
    answers[prompts.index("illness of ann?")] = "no idea"
    own = own_responses(probe_list, index, len(prompts), req)
    assert {(p.id, p.kind) for p, x in zip(probe_list, leaks(probe_list, index, answers, own)) if x} == {("e", "old")}
    assert {(p.id, p.kind) for p, x in zip(probe_list, leaks(probe_list, index, answers, [""] * len(prompts))) if x} \
        == {("a", "removed"), ("e", "old")}
    v = judge(probe_list, [True] * len(probe_list), [p.kind in ("new", "retained") for p in probe_list], leaked=got)
    assert v["removed"]["leaked"] == 1 and v["old"]["leaked"] == 1 and not v["verified"]
    assert "1 of 3 removed answers not in their own answer but given in another asked prompt's" in v["failures"]
    assert shortfall(v) == 2  # the two leaks: nothing else fails
    assert "replaced values given in another prompt's answer 1/2" in summary_line(v)
    assert "removed values given in another prompt's answer 1/3" in summary_line(v)
    assert "leaked" not in judge(probe_list, [True] * len(probe_list), [True] * len(probe_list))["removed"]


def test_shortfall_is_zero_exactly_when_verified():
    P = lambda kind: Probe("x", kind, None, ("t",))
    for before_n in range(0, 41):
        for kept in range(0, before_n + 1):
            probe_list = [P("retained") for _ in range(before_n)]
            v = judge(probe_list, [True] * before_n, [True] * kept + [False] * (before_n - kept))
            assert (shortfall(v) == 0) == v["verified"]


def test_verify_settings_are_checked():
    with pytest.raises(InputError, match="verify 'always': must be one of"):
        UnlearnSettings(verify="always")
    with pytest.raises(InputError, match="verify_seconds"):
        UnlearnSettings(verify_seconds=-1.0)


# --- on a tiny Llama that memorised random 4-digit "phone numbers" --------------------------------------

@pytest.fixture(scope="module")
def memorised(tmp_path_factory):
    """(folder, model, tokenizer, records): a LoRA adapter trained until greedy generation gives every answer."""
    from helpers import memorised_tiny

    root = tmp_path_factory.mktemp("memorised")
    model, tok, recs = memorised_tiny(root, 8, epochs=400, batch_size=8)
    model.save_pretrained(root / "adapter")
    return root, model, tok, recs


def _request(recs):
    return [{"op": "remove", "id": recs[0].id},
            {"op": "correct_response", "id": recs[1].id, "new": {"response": "0000"}}]


def test_verification_reports_a_removal_still_produced_and_a_missing_correction(memorised):
    """A step that cannot move (λ = 1e6): the removed answer is still produced and the correction is not,
    and the report says so; the adapter produced every answer before."""
    from llmeraser.api import unlearn_model

    from llmeraser.modeling import theta_of

    _, model, tok, recs = memorised
    before = theta_of(model)[1]
    s = UnlearnSettings(damping=1e6, curvature_samples=0, max_length=64, template="chat", device="cpu", verify_retained=6)
    res = unlearn_model(model, tok, recs, _request(recs), weight_decay=0.0, settings=s)
    v = res.report.verification
    assert v["removed"] == {"checked": 1, "unchecked": 0, "produced_before": 1, "still_produced": 1,
                            "still_produced_common": 0, "leaked": 0}
    assert v["corrected"]["produced"] == 0 and v["old"]["still_produced"] == 1
    assert v["retained"]["sampled"] == 6 and v["retained"]["produced_before"] == 6 and v["retained"]["kept"] == 6
    assert res.verified is False and v["extra_steps"] == [] and v["until_verified"] is False
    assert "1 of 1 removed answers still produced" in v["failures"]
    assert torch.equal(theta_of(model)[1], before)  # the caller's model is handed back with Θ̂ in place


def test_verification_passes_on_the_retrained_adapter(memorised):
    """The same checks at the adapter retrained on the edited data: verified."""
    from helpers import load_tiny

    from llmeraser.data import apply_request
    from llmeraser.modeling import theta_of
    from llmeraser.train import TrainSettings, add_lora, train_lora
    from llmeraser.verify import Verifier

    root, model, tok, recs = memorised
    req = request_from_rows(_request(recs), recs)
    recipe = TrainSettings(rank=4, alpha=8, epochs=400, lr=1e-2, batch_size=8, seed=0)
    other, tok2 = load_tiny(root / "base")
    other = add_lora(other, recipe)
    train_lora(other, tok2, apply_request(recs, req), recipe, progress=False)
    params, theta_hat = theta_of(model)
    verifier = Verifier(model, tok, params, theta_hat, recs, req, "chat", 64, 8, 6, 0)
    v = verifier.check(theta_of(other)[1])
    assert v["verified"], v["failures"]
    assert not verifier.check(theta_hat)["verified"]


def _strings(x):
    """Every string in a parsed JSON value, keys included."""
    if isinstance(x, str):
        yield x
    elif isinstance(x, dict):
        for k, v in x.items():
            yield k
            yield from _strings(v)
    elif isinstance(x, list):
        for v in x:
            yield from _strings(v)


def test_until_verified_stops_on_its_budget_with_the_not_verified_status(memorised, tmp_path, capsys):
    """Through the CLI: no step can pass at λ = 1e6, so --verify until stops (its step budget, a seconds budget
    already spent, or a step that moves Θ by nothing), the adapter is written with verified: false, the exit status
    is NOT_VERIFIED_EXIT, and stderr says plainly that the edit is not verified and retraining is advised.
    unlearn.json holds the private parts by SHA-256 only."""
    from helpers import write_jsonl

    from llmeraser.cli import main

    root, _, _, recs = memorised
    private = recs[0].sides()[1]
    req = write_jsonl(tmp_path / "request.jsonl", [{**_request(recs)[0], "private": [private]}, _request(recs)[1]])
    args = ["unlearn", "--base", str(root / "base"), "--adapter", str(root / "adapter"), "--data", str(root / "train.jsonl"),
            "--request", str(req), "--damping", "1e6", "--max-length", "64",
            "--template", "chat", "--device", "cpu", "--verify", "until", "--quiet", "--allow-unconverged"]
    config = tmp_path / "budget.json"  # the budgets are settings of the config: at most 20 flags
    for name, budget, stopped in (("steps0", {"verify_steps": 0}, "the budget of 0 extra steps ran out"),
                                  ("clock", {"verify_seconds": 1e-9}, "the budget of 1e-09 s ran out")):
        config.write_text(json.dumps({**budget, "verify_retained": 4, "curvature_samples": 0}))
        capsys.readouterr()
        assert main(args + ["--out", str(tmp_path / name), "--config", str(config)]) == NOT_VERIFIED_EXIT
        err = capsys.readouterr().err
        assert "the edit is NOT verified after 0 extra" in err and stopped in err and "retraining" in err
        text = (tmp_path / name / "unlearn.json").read_text()
        v = json.loads(text)["verification"]
        assert v["verified"] is False and v["extra_steps"] == [] and v["stopped"] == stopped
        # the removed answer is recorded by its SHA-256: in no string of the file (a number's digits, a timing's
        # "…6604…", may spell a short numeric answer by chance)
        assert not [s for s in _strings(json.loads(text)) if private in s]
    config.write_text(json.dumps({"verify_steps": 2, "verify_retained": 4}))
    assert main(args + ["--out", str(tmp_path / "steps"), "--config", str(config)]) == NOT_VERIFIED_EXIT
    meta = json.loads((tmp_path / "steps" / "unlearn.json").read_text())
    v = meta["verification"]
    assert 1 <= len(v["extra_steps"]) <= 2 and len(v["rounds"]) == len(v["extra_steps"]) + 1
    assert v["stopped"] == "the budget of 2 extra steps ran out" or "no progress" in v["stopped"]
    assert [st["step"] for st in meta["newton_steps"]] == list(range(1, len(v["extra_steps"]) + 2))
    # with --verify check the failed checks are reported, and the exit status is 0
    capsys.readouterr()
    assert main([a if a != "until" else "check" for a in args] + ["--out", str(tmp_path / "plain")]) == 0
    assert json.loads((tmp_path / "plain" / "unlearn.json").read_text())["verification"]["verified"] is False
    assert "warning: the edit is not verified" in capsys.readouterr().err


def test_until_pulls_still_produced_removals_toward_the_base(memorised):
    """With the memorised recipe (reset_removed ρ = 10) and Newton extra steps, an extra step adds the reset term over the removed
    records still produced, and the Θ kept is the one that missed least."""
    from llmeraser.api import unlearn_model
    from llmeraser.recipes import recipe

    _, model, tok, recs = memorised
    s = recipe("memorised", damping=1e6, max_length=64, template="chat", device="cpu", verify="until", verify_steps=1,
               verify_retained=4, newton_steps=1, verify_repair="newton")
    res = unlearn_model(model, tok, recs, [{"op": "remove", "id": recs[0].id}], weight_decay=0.0, settings=s)
    v = res.report.verification
    assert len(v["extra_steps"]) == 1 and v["extra_steps"][0]["reset_removed"] == 1
    assert [r["shortfall"] for r in v["rounds"]][0] >= 1
    best = min(range(len(v["rounds"])), key=lambda i: (v["rounds"][i]["shortfall"], -i))
    assert v["kept_after_extra_steps"] == best


def _after_a_removal(memorised):
    """(Unlearner at the memorised recipe's ρ with one Newton step, a request removing the first record, Θ after the
    first step, the records)."""
    from llmeraser.recipes import recipe
    from llmeraser.unlearner import Unlearner

    _, model, tok, recs = memorised
    req = request_from_rows([{"op": "remove", "id": recs[0].id}], recs)
    s = recipe("memorised", max_length=64, template="chat", device="cpu", newton_steps=1, reset_removed=10.0)
    model.eval()
    unl = Unlearner(model, tok, recs, s)
    delta, _, _ = unl.delta(req, progress=False)
    return unl, req, unl.theta_hat + delta, recs


def test_an_extra_step_with_the_reset_lowers_the_removed_records_penalty(memorised):
    """Refiner.step with still-produced removed records at the memorised recipe's ρ (λ = 0.03): the step lowers
    n·R' + ρ·P (Armijo), and leaves P, the removed record's distance to its reset target, below where the same step
    without the reset leaves it. (P alone need not fall from Θ: the step descends the sum, and may trade some of P
    for R'.)"""
    unl, req, theta, recs = _after_a_removal(memorised)
    plain, _, without = unl.more_steps(req, theta, progress=False)
    after, _, record = unl.more_steps(req, theta, progress=False, reset_ids=[recs[0].id])
    reset = unl.refiner.reset_term([unl.problem.examples[0]])
    assert record["reset_removed"] == 1 and record["line_search"]["accepted"] and "reset_removed" not in without
    assert reset.value(after) < reset.value(plain)
    objective = lambda t: unl.refiner.objective(t) + 10.0 * reset.value(t)
    assert objective(after) < objective(theta)


def test_extra_steps_on_the_same_removals_survive_the_generation_between_them(memorised):
    """Generation between two extra steps merges the adapter into the base weights and copies them back in place
    (modeling.merged_adapter), which bumps their autograd version counters: a reset linearisation kept from the first
    step and used by the second would fail "modified by an inplace operation". Each step's kept products are released
    with its solve, so the second step runs; and it starts from what the first left."""
    from llmeraser.modeling import merged_adapter

    unl, req, theta, recs = _after_a_removal(memorised)
    theta, _, first = unl.more_steps(req, theta, progress=False, reset_ids=[recs[0].id])
    assert unl.problem.memory.kept_in_all.get("reset", 0) > 0  # the case at issue: the first step kept its products
    with torch.no_grad(), merged_adapter(unl.problem.model):
        pass
    after, _, second = unl.more_steps(req, theta, progress=False, reset_ids=[recs[0].id])
    assert first["reset_removed"] == second["reset_removed"] == 1 and second["step"] == first["step"] + 1
    # the second step searched from the Θ the first left: Armijo lowered n·R' + ρ·P there (P alone need not fall: the
    # direction descends the sum, and a step may trade some of P for R')
    reset = unl.refiner.reset_term([unl.problem.examples[0]])
    objective = lambda t: unl.refiner.objective(t) + 10.0 * reset.value(t)
    assert second["line_search"]["accepted"] and objective(after) < objective(theta)


def test_an_extra_step_pulls_a_missing_correction_toward_its_new_answer(memorised):
    """Refiner.step with a correction not yet produced: at ρ the step lowers n·R' + ρ·L_new (Armijo) and lowers the
    new answer's loss further than the same step without the pull; without ρ nothing is pulled."""
    from llmeraser.recipes import recipe
    from llmeraser.unlearner import Unlearner

    _, model, tok, recs = memorised
    req = request_from_rows([_request(recs)[1]], recs)
    model.eval()
    losses = {}
    for rho in (0.0, 10.0):
        s = recipe("memorised", max_length=64, template="chat", device="cpu", newton_steps=1, reset_removed=rho)
        unl = Unlearner(model, tok, recs, s)
        delta, _, _ = unl.delta(req, progress=False)
        theta = unl.theta_hat + delta
        after, _, record = unl.more_steps(req, theta, progress=False, teach_ids=[recs[1].id, "not-an-edit"])
        new = unl.problem.batches(unl.problem.sets(req).new)
        losses[rho] = (unl.problem.loss_sum(new, theta), unl.problem.loss_sum(new, after))
        if rho:
            assert record["pulled_new"] == 1 and record["line_search"]["accepted"]
            pulled = lambda t: unl.refiner.objective(t) + rho * unl.problem.loss_sum(new, t)  # noqa: E731
            assert pulled(after) < pulled(theta)
        else:
            assert "pulled_new" not in record
    assert losses[10.0][0] == pytest.approx(losses[0.0][0], rel=1e-6)  # the same start
    assert losses[10.0][1] < losses[0.0][1] and losses[10.0][1] < losses[10.0][0]


def test_until_keeps_the_theta_that_missed_least(monkeypatch):
    """verify_edit with scripted checks: the first extra step halves what is missed, the second loses retained
    answers; the Θ written is the first step's, its solve is reported, and each step says whether it was kept."""
    from types import SimpleNamespace

    from llmeraser import api

    probe_list = [Probe("a", "removed", None, ("t",)), Probe("b", "removed", None, ("t",))] + \
        [Probe(f"k{i}", "retained", None, ("t",)) for i in range(4)]
    before = [True] * 6
    after = {0.0: [True, True, True, True, True, True],     # 2 removed answers still produced: shortfall 2
             1.0: [False, True, True, True, True, True],    # 1 still produced: shortfall 1
             2.0: [False, False, False, False, True, True]}  # forgotten, but 2 of 4 retained lost: shortfall 2

    class Scripted:
        def __init__(self, *args, **kwargs):
            pass

        def check(self, theta):
            return judge(probe_list, before, after[float(theta[0])])

    monkeypatch.setattr(api, "Verifier", Scripted)
    solves = []

    def more_steps(req, theta, progress, reset_ids=(), teach_ids=(), restore_ids=()):
        solves.append(SimpleNamespace(k=len(solves) + 2, reset_ids=reset_ids))
        return theta + 1, solves[-1], {"step": len(solves) + 1, "line_search": {"accepted": True}}

    settings = UnlearnSettings(verify="until", verify_steps=2)
    problem = SimpleNamespace(params=None, theta_hat=torch.zeros(3), template="chat")
    unl = SimpleNamespace(settings=settings, problem=problem, more_steps=more_steps, refiner=None)
    theta, v, solve = api.verify_edit(unl, None, None, [], None, torch.zeros(3), progress=False)
    assert [r["shortfall"] for r in v["rounds"]] == [2, 1, 2]
    assert float(theta[0]) == 1.0 and v["kept_after_extra_steps"] == 1 and solve is solves[0]
    assert [st["kept"] for st in v["extra_steps"]] == [True, False]
    assert v["stopped"] == "the budget of 2 extra steps ran out" and not v["verified"]
    assert solves[0].reset_ids == ["a", "b"] and solves[1].reset_ids == ["b"]  # the removed answers still produced


def test_worst_token_nll_against_a_loop_over_tokens_and_below_ln2_it_is_greedy(memorised):
    """Problem.worst_token_nll against an explicit loop over one record's tokens, in the order given; and the
    certificate it serves: an answer whose every token is below ln 2 is produced by greedy generation."""
    from llmeraser.problem import Problem
    from llmeraser.verify import CERTAIN_NLL, Verifier

    _, model, tok, recs = memorised
    model.eval()
    p = Problem(model, tok, recs, "chat", 64, batch_size=3)
    items = list(reversed(p.examples))  # not in length order
    got = p.worst_token_nll(items, p.theta_hat)
    for x, v in zip(items, got):
        (b,) = p.batches([x], prepare=False)
        logits = p.objective.outputs(p.params.unflatten(p.theta_hat), b)
        slow = max(-float(torch.log_softmax(logits[t].double(), -1)[b["targets"][t]]) for t in range(len(b["targets"])))
        assert v == pytest.approx(slow, rel=1e-5, abs=1e-7)
    certain = [r.id for r, v in zip(reversed(recs), got) if v < CERTAIN_NLL]
    assert certain  # the memorised adapter is sure of its answers
    req = request_from_rows([{"op": "remove", "id": recs[0].id}], recs)
    verifier = Verifier(model, tok, p.params, p.theta_hat, recs, req, "chat", 64, 8, len(recs), 0)
    produced_ids = {pr.id for pr, hit in zip(verifier.probes, verifier.before) if pr.kind == "retained" and hit}
    assert set(certain) - {recs[0].id} <= produced_ids


def test_uncertain_kept_names_the_kept_answers_an_edit_made_uncertain(memorised):
    """Unlearner.uncertain_kept at a Θ that undoes part of the adapter: exactly the kept records certain at Θ̂
    (every token's −log p < ln 2) and not at Θ, by id; never an edited record; none at Θ̂ itself."""
    from llmeraser.recipes import recipe
    from llmeraser.unlearner import Unlearner
    from llmeraser.verify import CERTAIN_NLL

    _, model, tok, recs = memorised
    model.eval()
    req = request_from_rows([{"op": "remove", "id": recs[0].id}], recs)
    unl = Unlearner(model, tok, recs, recipe("memorised", max_length=64, template="chat", device="cpu"))
    p = unl.problem
    assert unl.uncertain_kept(req, p.theta_hat) == []
    theta = 0.6 * p.theta_hat  # a shrunken adapter: some answers lose their margin
    before, after = p.worst_token_nll(p.examples, p.theta_hat), p.worst_token_nll(p.examples, theta)
    expected = [r.id for r, b, a in zip(recs[1:], before[1:], after[1:]) if b < CERTAIN_NLL <= a]
    assert expected, "the shrunken adapter must make some answer uncertain for this test to mean anything"
    assert unl.uncertain_kept(req, theta) == expected


def test_an_extra_step_restores_an_uncertain_kept_answer(memorised):
    """Refiner.step with kept records to restore at ρ: the step lowers n·R' + ρ·Σ_T L_i and their loss further than
    the same step without them; the record counts them."""
    from llmeraser.recipes import recipe
    from llmeraser.unlearner import Unlearner

    _, model, tok, recs = memorised
    model.eval()
    req = request_from_rows([{"op": "remove", "id": recs[0].id}], recs)
    s = recipe("memorised", max_length=64, template="chat", device="cpu", newton_steps=1, reset_removed=10.0)
    theta = 0.6 * Unlearner(model, tok, recs, s).theta_hat
    losses = {}
    for restore in ((), (recs[2].id, recs[3].id, "not-kept", recs[0].id)):
        unl = Unlearner(model, tok, recs, s)
        unl.delta(req, progress=False)
        after, _, record = unl.more_steps(req, theta, progress=False, restore_ids=restore)
        batches = unl.problem.batches([unl.problem.examples[2], unl.problem.examples[3]])
        losses[restore] = (unl.problem.loss_sum(batches, theta), unl.problem.loss_sum(batches, after))
        if restore:
            assert record["restored_kept"] == 2 and record["pulled_new"] == 0 and record["line_search"]["accepted"]
            pulled = lambda t: unl.refiner.objective(t) + 10.0 * unl.problem.loss_sum(batches, t)  # noqa: E731
            assert pulled(after) < pulled(theta)
        else:
            assert "restored_kept" not in record
    without, with_ = losses[()], losses[next(k for k in losses if k)]
    assert with_[0] == pytest.approx(without[0], rel=1e-6) and with_[1] < without[1] and with_[1] < with_[0]


def test_verify_restore_without_a_reset_weight_is_refused():
    """verify_restore weights by ρ = reset_removed; with ρ = 0 it would silently do nothing."""
    with pytest.raises(InputError, match="verify_restore weights the kept records by reset_removed's ρ"):
        UnlearnSettings(curvature="ggn", verify_restore=True)
    assert UnlearnSettings(curvature="ggn", reset_removed=10.0, verify_restore=True).verify_restore


def test_the_memorised_recipes_restore_follows_a_chosen_rho_of_zero():
    """The memorised recipe turns verify_restore on; with Newton extra steps a user's ρ = 0 turns it off with it
    (overrides or --config), unless verify_restore is asked for too, which is then refused as above. Its own
    gradient rounds need no ρ for it, and keep it."""
    from llmeraser.recipes import recipe, resolve

    assert recipe("memorised").verify_restore and recipe("memorised").verify_steps == 10
    assert recipe("memorised").verify_repair == "gradient" and recipe("memorised", reset_removed=0.0).verify_restore
    newton = {"verify_repair": "newton"}
    assert not recipe("memorised", reset_removed=0.0, **newton).verify_restore
    assert recipe("memorised", reset_removed=3.0, **newton).verify_restore
    assert not resolve("memorised", {"recipe": None, "settings": {"reset_removed": 0, **newton}})[1].verify_restore
    assert not resolve("memorised", None, {"reset_removed": 0.0, **newton})[1].verify_restore
    with pytest.raises(InputError, match="verify_restore weights"):
        resolve("memorised", None, {"reset_removed": 0.0, "verify_restore": True, **newton})
    assert not recipe("default").verify_restore and recipe("default").verify_steps == 4


def test_a_sure_teacher_forced_answer_is_how_greedy_generation_starts(memorised):
    """AdapterEval.sure_answers against generation itself: every answer it vouches for is the start of the greedy
    answer, at Θ̂, under a stricter bound that only some answers meet, and at a shrunken Θ; and a
    generation config that is not the plain argmax (a repetition penalty) makes it vouch for none."""
    from llmeraser.evaluate import AdapterEval
    from llmeraser.modeling import adapter_at, fused_attention, merged_adapter, theta_of
    from llmeraser.verify import SURE_NLL, normalise

    _, model, tok, recs = memorised
    model.eval()
    params, theta_hat = theta_of(model)
    ev = AdapterEval(model, tok, "chat", 3, 64, 16)
    vouched = {}
    for scale, sure_nll in ((1.0, SURE_NLL), (1.0, 0.3), (0.6, SURE_NLL)):
        with adapter_at(model, params, scale * theta_hat), fused_attention(model), merged_adapter(model):
            sure, answers = ev.sure_answers(recs, sure_nll)[0], ev.generate(recs)
        vouched[scale, sure_nll] = sum(s is not None for s in sure)
        for s, a in zip(sure, answers):
            assert s is None or normalise(a).startswith(normalise(s)), (s, a)
    # all at Θ̂; some under a stricter bound (the tiny model's tokens have p_t from 0.68 to 0.97); none at 0.6·Θ̂
    assert list(vouched.values())[::2] == [len(recs), 0] and 0 < vouched[1.0, 0.3] < len(recs), vouched
    old = model.generation_config.repetition_penalty
    model.generation_config.repetition_penalty = 1.3
    try:
        assert ev.sure_answers(recs, SURE_NLL) == ([None] * len(recs), [False] * len(recs))
    finally:
        model.generation_config.repetition_penalty = old


def test_the_teacher_forced_shortcut_gives_the_figures_of_generating_every_answer(memorised):
    """Verifier.check with and without the shortcut: the same hits for every probe at Θ̂, at a shrunken Θ and at
    the zero adapter, while the shortcut generates fewer prompts where the adapter is sure of its answers."""
    from llmeraser.modeling import theta_of
    from llmeraser.verify import Verifier

    _, model, tok, recs = memorised
    model.eval()
    params, theta_hat = theta_of(model)
    req = request_from_rows(_request(recs), recs)
    fast, slow = (Verifier(model, tok, params, theta_hat, recs, req, "chat", 64, 8, len(recs), 0, teacher_forced=tf)
                  for tf in (True, False))
    assert fast.before == slow.before
    for theta in (theta_hat, 0.6 * theta_hat, torch.zeros_like(theta_hat)):
        a, b = fast.check(theta), slow.check(theta)
        assert a["records"] == b["records"] and a["verified"] == b["verified"]
        assert b["generated"] == b["prompts"] and a["prompts"] == b["prompts"]
    # at Θ̂ only the prompts of the edits are generated: the removed answer is sure (settled as still produced),
    # while the correction's prompt must be generated to see that the old answer is absent
    assert fast.check(theta_hat)["generated"] == 1


def test_a_correction_greedy_gives_on_a_near_tie_is_not_produced(memorised):
    """A new answer counts only when the teacher-forced pass is sure of it: with generation giving every record's
    response but the pass sure of none, the correction is not produced while the retained answers (judged by
    generation) stay; where the pass cannot tell (a truncated record), generation alone decides."""
    from types import SimpleNamespace

    from llmeraser.modeling import theta_of
    from llmeraser.verify import Verifier

    _, model, tok, recs = memorised
    model.eval()
    params, theta_hat = theta_of(model)
    verifier = Verifier(model, tok, params, theta_hat, recs, request_from_rows(_request(recs), recs), "chat", 64, 8, 4, 0)
    own_answers = lambda rs: [r.sides()[1] for r in rs]  # noqa: E731 - greedy gives every record's response
    real = verifier.eval  # its teacher-forced scores still serve the extraction figures
    for told, produced_count in ((True, 0), (False, 1)):
        verifier.eval = SimpleNamespace(generate=own_answers, scored=real.scored, tok=real.tok, template=real.template,
                                        sure_answers=lambda rs, nll, told=told: ([None] * len(rs), [told] * len(rs)))
        v = verifier.check(theta_hat)
        assert v["corrected"]["produced"] == produced_count and v["retained"]["kept"] == v["retained"]["produced_before"] == 4
        assert ("1 of 1 corrections not produced" in v["failures"]) == (produced_count == 0)


def test_extraction_reports_the_removed_values_probability_at_theta_at_theta_hat_and_under_the_base(memorised):
    """The removed and replaced targets' log10 P: at Θ = Θ̂ the same as before the edit; at Θ = 0 (LoRA's BA = 0) the
    base model's; the memorised adapter gives its removed answer a probability far above the base model's."""
    from llmeraser.modeling import theta_of
    from llmeraser.verify import Verifier, extraction, summary_line

    _, model, tok, recs = memorised
    params, theta_hat = theta_of(model)
    req = request_from_rows(_request(recs), recs)
    verifier = Verifier(model, tok, params, theta_hat, recs, req, "chat", 64, 8, 4, 0)
    assert [(r.id, t) for r, t in verifier.parts] == [(recs[0].id, recs[0].sides()[1]), (recs[1].id, recs[1].sides()[1])]
    at_hat, at_zero = verifier.check(theta_hat)["extraction"], verifier.check(torch.zeros_like(theta_hat))["extraction"]
    assert at_hat["measured"] == 2 and at_hat["after"] == at_hat["before"]
    assert at_zero["after"]["max_log10p"] == pytest.approx(at_zero["base"]["max_log10p"], abs=1e-4)
    assert at_zero["after"]["median_log10p"] == pytest.approx(at_zero["base"]["median_log10p"], abs=1e-4)
    assert at_hat["before"]["max_log10p"] > -0.5 > at_hat["base"]["max_log10p"] + 1
    assert "largest chance of being sampled after their sentence" in summary_line(verifier.check(theta_hat))
    # parts measured only where every state has a figure; the base's missing figure drops that part
    x = extraction([None, -3.0, -5.0], [-0.1, -0.2, None], [-2.0, -4.0, -1.0])
    assert x["measured"] == 1 and x["after"] == {"max_log10p": -4.0, "median_log10p": -4.0} and x["base"]["max_log10p"] == -3.0
    assert extraction(None, [-0.1, -0.3], [-2.0, -4.0])["base"] is None


def test_verify_extractable_fails_a_removal_still_likely_by_sampling(memorised):
    """With verify_extractable m: a removed answer greedy decoding no longer gives, but whose log10 P exceeds the base
    model's by more than m, fails the check and counts in the shortfall; at m above the gap it passes that check."""
    from llmeraser.modeling import theta_of
    from llmeraser.verify import Verifier

    _, model, tok, recs = memorised
    params, theta_hat = theta_of(model)
    req = request_from_rows([{"op": "remove", "id": recs[0].id}], recs)
    plain = Verifier(model, tok, params, theta_hat, recs, req, "chat", 64, 8, 4, 0)
    # at Θ̂ the removed answer is produced and far likelier than under the base model
    gap = plain.before_log10p[0] - plain.base_log10p[0]
    assert gap > 1
    strict = Verifier(model, tok, params, theta_hat, recs, req, "chat", 64, 8, 4, 0, extractable=gap / 2)
    loose = Verifier(model, tok, params, theta_hat, recs, req, "chat", 64, 8, 4, 0, extractable=gap * 2)
    # as if greedy decoding no longer gave it: the likelihood alone decides
    probe = next(k for k, p in enumerate(strict.probes) if p.kind == "removed")
    hits = [h and k != probe for k, h in enumerate(strict.hits(theta_hat))]
    after = strict._log10p(theta_hat)
    v = judge(strict.probes, strict.before, hits, strict.likely(after))
    assert v["removed"]["still_likely"] == 1 and v["removed"]["still_produced"] == 0 and not v["verified"]
    assert shortfall(v) == 1 and any("likely by sampling" in f for f in v["failures"])
    assert [r["likely"] for r in v["records"] if r["kind"] == "removed"] == [True]
    ok = judge(loose.probes, loose.before, hits, loose.likely(after))
    assert ok["removed"]["still_likely"] == 0 and ok["verified"], ok["failures"]
    assert "still_likely" not in judge(plain.probes, plain.before, hits, plain.likely(after))["removed"]  # off by default
    with pytest.raises(InputError, match="verify_extractable"):
        UnlearnSettings(verify_extractable=-1.0)


def test_until_pulls_a_removal_still_likely_though_not_produced(monkeypatch):
    """verify_edit with a scripted check: removed record "a" is not produced but still likely by sampling (Verifier.likely),
    "b" is neither; the extra step's reset takes "a" alone, and the next check, with "a" no longer likely, passes."""
    from types import SimpleNamespace

    from llmeraser import api

    probe_list = [Probe("a", "removed", None, ("t",)), Probe("b", "removed", None, ("t",))] + \
        [Probe(f"k{i}", "retained", None, ("t",)) for i in range(4)]
    before, hits = [True] * 6, [False, False, True, True, True, True]
    likely = {0.0: [True, False, False, False, False, False], 1.0: [False] * 6}

    class Scripted:
        def __init__(self, *args, **kwargs):
            assert kwargs["extractable"] == 3.0

        def check(self, theta):
            return judge(probe_list, before, hits, likely[float(theta[0])])

    monkeypatch.setattr(api, "Verifier", Scripted)
    solves = []

    def more_steps(req, theta, progress, reset_ids=(), teach_ids=(), restore_ids=()):
        solves.append(reset_ids)
        return theta + 1, None, {"step": len(solves) + 1, "line_search": {"accepted": True}}

    settings = UnlearnSettings(verify="until", verify_steps=3, verify_extractable=3.0)
    problem = SimpleNamespace(params=None, theta_hat=torch.zeros(3), template="chat")
    unl = SimpleNamespace(settings=settings, problem=problem, more_steps=more_steps, refiner=None)
    theta, v, _ = api.verify_edit(unl, None, None, [], None, torch.zeros(3), progress=False)
    assert solves == [["a"]] and v["verified"] and float(theta[0]) == 1.0
    assert [r["shortfall"] for r in v["rounds"]] == [1, 0]


def test_a_corrections_old_value_still_likely_fails_the_check():
    """verify_extractable judges a correction's old value as it judges a removed one: not produced but likely by
    sampling is a failure, in the shortfall and the summary line."""
    probe_list = [Probe("d", "new", None, ("n",)), Probe("d", "old", None, ("o",)), Probe("k", "retained", None, ("t",))]
    v = judge(probe_list, [False, True, True], [True, False, True], [False, True, False])
    assert v["old"]["still_likely"] == 1 and v["old"]["still_produced"] == 0 and not v["verified"]
    assert shortfall(v) == 1 and any("replaced answers or private parts not produced but still likely" in f for f in v["failures"])
    assert "replaced answers not produced but likely by sampling 1/1" in summary_line(v)
    assert judge(probe_list, [False, True, True], [True, False, True], [False] * 3)["verified"]


def test_verify_pull_weights_the_missing_correction_in_place_of_rho(memorised):
    """With verify_pull = ρ_T the teach term is ρ_T·Σ_T L_i whatever reset_removed's ρ is: the step from the same Θ
    equals the one reset_removed = ρ_T takes (no removal is pulled here), and differs from the one ρ takes."""
    from llmeraser.recipes import recipe
    from llmeraser.unlearner import Unlearner

    _, model, tok, recs = memorised
    req = request_from_rows([_request(recs)[1]], recs)
    model.eval()
    after = {}
    for key, rho, pull in (("pull 40", 10.0, 40.0), ("rho 40", 40.0, 0.0), ("rho 10", 10.0, 0.0)):
        s = recipe("memorised", max_length=64, template="chat", device="cpu", newton_steps=1, reset_removed=rho,
                   verify_pull=pull, verify_repair="newton")
        unl = Unlearner(model, tok, recs, s)
        delta, _, _ = unl.delta(req, progress=False)
        theta, record = unl.more_steps(req, unl.theta_hat + delta, progress=False, teach_ids=[recs[1].id])[::2]
        assert record["pull_weight"] == 40.0 if key != "rho 10" else record["pull_weight"] == 10.0
        after[key] = theta
    torch.testing.assert_close(after["pull 40"], after["rho 40"], rtol=1e-5, atol=1e-7)
    assert (after["pull 40"] - after["rho 10"]).norm() > 1e-3 * after["rho 10"].norm()


def test_verify_pull_is_checked():
    with pytest.raises(InputError, match="verify_pull -1.0: give a weight >= 0"):
        UnlearnSettings(verify_pull=-1.0)
    assert UnlearnSettings(curvature="ggn", verify_pull=5.0, verify_restore=True).verify_restore


def test_backtrack_halves_past_a_scale_its_guard_refuses():
    """On f(Θ) = ‖Θ‖² from Θ = 1 along −Θ Armijo takes α = 1; a guard refusing α > ¼ gives ¼ (asked only where
    Armijo held, its count in the trace), and one refusing every α gives the smallest, not accepted."""
    from llmeraser.acceptance import backtrack

    theta = torch.ones(3, dtype=torch.float64)
    f = lambda t: float(t.square().sum())  # noqa: E731
    asked = []

    def guard(t):
        asked.append(float(1 - t[0]))
        return float(1 - t[0]) <= 0.25, len(asked)

    assert backtrack(f, theta, -theta, -6.0)["scale"] == 1.0
    search = backtrack(f, theta, -theta, -6.0, guard=guard)
    assert search["accepted"] and search["scale"] == 0.25 and asked == [1.0, 0.5, 0.25]
    assert [t.get("kept_uncertain") for t in search["trace"]] == [1, 2, 3]
    asked.clear()  # along −3Θ Armijo fails at α = 1 (f = 4·3): the guard is not asked there
    assert backtrack(f, theta, -3 * theta, -18.0, guard=guard)["scale"] == 0.0625 and asked == [1.5, 0.75, 0.375, 0.1875]
    none = backtrack(f, theta, -theta, -6.0, max_halvings=3, guard=lambda t: (False, 9))
    assert not none["accepted"] and none["scale"] == 0.125


def test_line_search_kept_refuses_a_first_step_that_loses_kept_answers(memorised):
    """A reset weight large enough that the full first step makes kept answers uncertain: with line_search_kept
    the search halves until at most ⌊f·certain⌋ of them are, and says how many at each scale it checked; the
    Newton step after it is guarded too."""
    from llmeraser.recipes import recipe
    from llmeraser.unlearner import Unlearner

    _, model, tok, recs = memorised
    model.eval()
    req = request_from_rows([{"op": "remove", "id": recs[0].id}], recs)
    out = {}
    for f in (0.0, 0.01):
        unl = Unlearner(model, tok, recs, recipe("memorised", max_length=64, template="chat", device="cpu",
                                                 newton_steps=2, reset_removed=1000.0, line_search_kept=f))
        delta, _, stage = unl.delta(req, progress=False)
        out[f] = (unl.uncertain_kept(req, unl.theta_hat + delta), stage["steps"][0]["line_search"],
                  stage["steps"][1]["line_search"])
    lost, search, _ = out[0.0]
    assert lost, "the unguarded steps must lose a kept answer for this test to mean anything"
    kept_lost, guarded, second = out[0.01]
    assert kept_lost == [] and guarded["accepted"] and guarded["scale"] < search["scale"]
    assert guarded["trace"][-1]["kept_uncertain"] == 0 and all("kept_uncertain" not in t for t in search["trace"])
    assert second["accepted"] and second["trace"][-1]["kept_uncertain"] == 0


def test_line_search_kept_is_checked():
    with pytest.raises(InputError, match=r"line_search_kept 1.0: give a fraction in \[0, 1\)"):
        UnlearnSettings(line_search_kept=1.0)
    with pytest.raises(InputError, match="turn line_search on"):
        UnlearnSettings(line_search_kept=0.05, line_search=False)
