"""Verification by greedy generation (verify.py) and `unlearn --verify until`."""

import json

import pytest
import torch

from llmeraser.data import load_records, request_from_rows
from llmeraser.errors import NOT_VERIFIED_EXIT, InputError
from llmeraser.settings import UnlearnSettings
from llmeraser.verify import Probe, judge, probes, produced, shortfall

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
    assert got["e", "new"].targets == ("9012",) and got["e", "new"].ask.fields["prompt"] == "phone of EVE?"
    assert ("e", "old") not in got  # nothing of the old query is marked private
    assert [p.id for p in probes(req, recs, 5, 0) if p.kind == "retained"] == ["c"]  # the only kept record


def test_private_must_occur_in_the_record():
    recs = records()
    with pytest.raises(InputError, match="'private' 'bob@x.org' does not occur in record 'a'"):
        request_from_rows([{"op": "remove", "id": "a", "private": ["bob@x.org"]}], recs)
    with pytest.raises(InputError, match="'private' must be a non-empty list"):
        request_from_rows([{"op": "remove", "id": "a", "private": "ann@x.org"}], recs)


def test_judge_counts_and_verdict():
    P = lambda kind, shared=False: Probe("x", kind, None, ("t",), shared)
    probe_list = [P("removed"), P("removed", shared=True), P("new"), P("old"),
                  *[P("retained") for _ in range(20)]]
    # removed: produced before and after; shared removed: ignored; new: absent; old: absent;
    # retained: 19 produced before, 18 of them after (18/19 = 0.947 < 0.95), 1 never produced
    before = [True, True, False, True] + [True] * 19 + [False]
    after = [True, True, False, False] + [True] * 18 + [False, True]
    v = judge(probe_list, before, after)
    assert v["removed"] == {"checked": 1, "unchecked_shared": 1, "produced_before": 1, "still_produced": 1}
    assert v["corrected"] == {"checked": 1, "produced": 0, "produced_before": 0, "old_checked": 1, "old_still_produced": 0}
    assert v["retained"] == {"sampled": 20, "produced_before": 19, "kept": 18, "kept_share": 18 / 19}
    assert not v["verified"]
    assert v["failures"] == ["1 of 1 removed answers still produced", "1 of 1 corrections not produced",
                             "18 of 19 sampled retained answers kept (< 95%)"]
    good = judge(probe_list, before, [False, True, True, False] + [True] * 19 + [False])
    assert good["verified"] and good["failures"] == []
    # the shortfall in records: 1 removed + 1 correction + 1 retained answer beyond the 5% allowed (18 < 19 of 19)
    assert shortfall(v) == 3 and shortfall(good) == 0


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
    from helpers import load_tiny, make_base, toy_records, write_jsonl

    from llmeraser.train import TrainSettings, add_lora, train_lora

    root = tmp_path_factory.mktemp("memorised")
    make_base(root / "base", hidden=32, init_range=0.3)
    recs = load_records(write_jsonl(root / "train.jsonl", toy_records(8)))
    recipe = TrainSettings(rank=4, alpha=8, epochs=400, lr=1e-2, batch_size=8, seed=0)
    model, tok = load_tiny(root / "base")
    model = add_lora(model, recipe)
    train_lora(model, tok, recs, recipe, progress=False)
    model.eval()
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
    assert v["removed"] == {"checked": 1, "unchecked_shared": 0, "produced_before": 1, "still_produced": 1}
    assert v["corrected"]["produced"] == 0 and v["corrected"]["old_still_produced"] == 1
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


def test_until_verified_stops_on_its_budget_with_the_not_verified_status(memorised, tmp_path):
    """Through the CLI: with λ = 1e6 no step can pass, so two extra steps are taken, the adapter is written with
    verified: false, and the exit status is NOT_VERIFIED_EXIT; a seconds budget already spent takes none."""
    from helpers import write_jsonl

    from llmeraser.cli import main

    root, _, _, recs = memorised
    req = write_jsonl(tmp_path / "request.jsonl", _request(recs))
    args = ["unlearn", "--base", str(root / "base"), "--adapter", str(root / "adapter"), "--data", str(root / "train.jsonl"),
            "--request", str(req), "--damping", "1e6", "--curvature-samples", "0", "--max-length", "64",
            "--template", "chat", "--device", "cpu", "--verify", "until", "--quiet", "--allow-unconverged"]
    config = tmp_path / "budget.json"  # the budgets are settings of the config: at most 20 flags
    config.write_text(json.dumps({"verify_steps": 2, "verify_retained": 4}))
    assert main(args + ["--out", str(tmp_path / "steps"), "--config", str(config)]) == NOT_VERIFIED_EXIT
    v = json.loads((tmp_path / "steps" / "unlearn.json").read_text())["verification"]
    assert v["verified"] is False and len(v["extra_steps"]) == 2 and len(v["rounds"]) == 3
    assert v["stopped"] == "the budget of 2 extra steps ran out"
    meta = json.loads((tmp_path / "steps" / "unlearn.json").read_text())
    assert [st["step"] for st in meta["newton_steps"]] == [1, 2, 3]
    config.write_text(json.dumps({"verify_seconds": 1e-9, "verify_retained": 4}))
    assert main(args + ["--out", str(tmp_path / "clock"), "--config", str(config)]) == NOT_VERIFIED_EXIT
    v = json.loads((tmp_path / "clock" / "unlearn.json").read_text())["verification"]
    assert v["extra_steps"] == [] and v["stopped"] == "the budget of 1e-09 s ran out"
    # with --verify check the failed checks are reported, and the exit status is 0
    assert main([a if a != "until" else "check" for a in args] + ["--out", str(tmp_path / "plain")]) == 0
    assert json.loads((tmp_path / "plain" / "unlearn.json").read_text())["verification"]["verified"] is False


def test_until_pulls_still_produced_removals_toward_the_base(memorised):
    """With the memorised recipe (reset_removed ρ = 10), an extra step adds the reset term over the removed
    records still produced, and the Θ kept is the one that missed least."""
    from llmeraser.api import unlearn_model
    from llmeraser.recipes import recipe

    _, model, tok, recs = memorised
    s = recipe("memorised", damping=1e6, max_length=64, template="chat", device="cpu", verify="until", verify_steps=1,
               verify_retained=4, newton_steps=1)
    res = unlearn_model(model, tok, recs, [{"op": "remove", "id": recs[0].id}], weight_decay=0.0, settings=s)
    v = res.report.verification
    assert len(v["extra_steps"]) == 1 and v["extra_steps"][0]["reset_removed"] == 1
    assert [r["shortfall"] for r in v["rounds"]][0] >= 1
    best = min(range(len(v["rounds"])), key=lambda i: (v["rounds"][i]["shortfall"], -i))
    assert v["kept_after_extra_steps"] == best
