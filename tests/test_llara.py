"""The LLaRA scenario (benchmarks/llara.py): its data, request and metrics, and the whole run on the tiny model.
Reads ../shared/data; skipped where it is absent (a user's clone)."""

from dataclasses import replace
from pathlib import Path

import pytest

from benchmarks.llara import QUICK, build, hit_ratio, records_only
from llmeraser.data import apply_request, records_from_rows, request_from_rows

ROOT = Path(__file__).resolve().parents[2] / "shared" / "data"
pytestmark = pytest.mark.skipif(not (ROOT / "tallrec-movie" / "valid.json").is_file(),
                                reason=f"{ROOT}/tallrec-movie/valid.json absent (benchmark data beside the checkout)")
TINY = replace(QUICK, n_train=10, n_test=4, candidates=3, history=2, width=8, gru_epochs=3, epochs=1.0, lr=1e-2)


def test_the_request_turns_the_corrupted_histories_back_into_the_clean_ones():
    b = build(ROOT, QUICK)
    noisy, clean = records_from_rows(records_only(b["noisy"])), records_only(b["clean"])
    req = request_from_rows(b["request"], noisy)
    assert [r.fields for r in apply_request(noisy, req)] == clean
    assert len(b["request"]) == 4  # ⌈10% of 40⌉
    for e in b["request"]:
        before = next(r for r in b["noisy"] if r["id"] == e["id"])
        after = next(r for r in b["clean"] if r["id"] == e["id"])
        assert len(before["history"]) == len(after["history"]) + 1 and before["injected"] not in after["history"]
        assert before["prompt"].count("[[item:") == after["prompt"].count("[[item:") + 1  # title and slot together
    for r in b["clean"] + b["test"]:
        assert r["next"] in r["candidates"] and len(set(r["candidates"])) == QUICK.candidates
        assert r["prompt"].count("[[item:") == len(r["history"]) + QUICK.candidates
    assert b["table"].shape == (len(b["names"]), QUICK.width)
    again = build(ROOT, QUICK)  # seeded
    assert again["noisy"] == b["noisy"] and bool((again["table"] == b["table"]).all())


def test_hit_ratio_and_valid_share():
    names = ["Heat (1995)", "Up (2009)", "Jaws (1975)"]
    rows = [{"next": 0, "candidates": [0, 1]}, {"next": 1, "candidates": [1, 2]}, {"next": 2, "candidates": [2, 0]}]
    m = hit_ratio(["heat (1995).", "Jaws (1975)", "something else"], rows, names)
    assert m == {"hit_ratio_at_1": 1 / 3, "valid": 2 / 3, "n": 3, "hits": [True, False, False]}


@pytest.mark.slow
def test_the_scenario_runs_end_to_end_on_the_tiny_model(trainable_dir, tmp_path):
    from helpers import load_tiny
    from safetensors.torch import load_file

    from benchmarks.llara import run

    mt = load_tiny(trainable_dir / "base")
    recipe = {"rank": 2, "alpha": 4, "target_modules": ("q_proj", "v_proj"), "epochs": 1.0, "lr": 1e-2, "batch_size": 4,
              "max_length": 1024}
    result = run(TINY, str(trainable_dir / "base"), tmp_path, mt, ROOT, False, lambda msg: None, recipe)
    assert set(result["metrics"]) == {"original", "retrain", "llmeraser", "finetune-corrected"}
    for m in result["metrics"].values():
        assert 0 <= m["test"]["hit_ratio_at_1"] <= m["test"]["valid"] <= 1 and m["test"]["n"] == 4
    d = result["llmeraser_minus_retrain_hit_ratio"]
    assert d["low"] <= d["point"] <= d["high"]
    a, b = (load_file(str(tmp_path / d / "llmeraser_modules.safetensors")) for d in ("original", "llmeraser"))
    assert not bool((a["item_slots.projector.0.weight"] == b["item_slots.projector.0.weight"]).all())
    r = load_file(str(tmp_path / "retrain" / "llmeraser_modules.safetensors"))
    assert bool((r["item_slots.table"] == a["item_slots.table"]).all())  # retraining reads the same table
