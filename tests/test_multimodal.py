"""The multimodal scenario (benchmarks/multimodal.py): its data and request, and the whole run on a tiny LLaVA."""

import json
from dataclasses import replace

from benchmarks.multimodal import QUICK, build, first_digit, run
from llmeraser.data import apply_request, load_records, request_from_rows

from helpers import load_tiny, make_llava

TINY = replace(QUICK, n_train=10, n_test=6, image_size=8, epochs=1.0, lr=1e-2)


def test_the_request_corrects_exactly_the_wrong_answers(tmp_path):
    b = build(QUICK, tmp_path)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in b["noisy"]))
    noisy = load_records(tmp_path / "train.jsonl")  # the images exist and are readable
    req = request_from_rows(b["request"], noisy)
    assert [r.fields for r in apply_request(noisy, req)] == b["clean"]
    assert len(b["request"]) == round(0.3 * QUICK.n_train)
    wrong = [r for r, c in zip(b["noisy"], b["clean"]) if r["response"] != c["response"]]
    assert len(wrong) == len(b["request"])  # every corrupted answer is wrong, every other one right
    assert {r["id"] for r in b["test"]}.isdisjoint(r["id"] for r in b["clean"])
    assert build(QUICK, tmp_path) == b  # seeded


def test_first_digit():
    assert first_digit("The digit 7 is") == "7" and first_digit("no digit") is None


def test_the_scenario_runs_end_to_end_on_a_tiny_llava(tmp_path):
    make_llava(tmp_path / "base")
    mt = load_tiny(tmp_path / "base")
    recipe = {"rank": 2, "alpha": 4, "target_modules": ("q_proj", "v_proj"), "epochs": 1.0, "lr": 1e-2, "batch_size": 4,
              "max_length": 256}
    result = run(TINY, tmp_path / "work", False, lambda msg: None, str(tmp_path / "base"), mt, recipe)
    assert set(result["metrics"]) == {"original", "retrain", "llmeraser", "finetune-corrected"}
    d = result["llmeraser_minus_retrain_test_accuracy"]
    assert d["low"] <= d["point"] <= d["high"]
    assert 0 <= result["vision_probe_test_accuracy"] <= 1 and result["edits"] == 3
