"""benchmarks/dtype_check.py (the heart of the GPU check) on a tiny demo-shaped folder, on the CPU: it must work the
day a GPU is lent, and its figures must mean what they say."""

import json
import shutil

from benchmarks.dtype_check import main

from helpers import toy_records, write_jsonl


def test_dtype_check_compares_each_dtype_with_float32_and_a_training_step(tiny_dir, tmp_path):
    from llmeraser.train import TrainSettings

    run = tmp_path / "run"
    shutil.copytree(tiny_dir / "adapter", run / "original")
    (run / "original" / "train.json").write_text(json.dumps({"arguments": TrainSettings(batch_size=4, max_length=64).to_dict()}))
    (run / "inputs").mkdir()
    write_jsonl(run / "inputs" / "data.jsonl", toy_records(12))
    write_jsonl(run / "inputs" / "request.jsonl", [{"op": "remove", "id": "r1"},
                                                   {"op": "correct_response", "id": "r4", "new": {"response": "1234"}}])
    assert main(["--run", str(run), "--base", str(tiny_dir / "base"), "--device", "cpu",
                 "--dtypes", "float32", "bfloat16", "float32-ckpt", "--out", str(tmp_path / "out")]) == 0
    res = json.loads((tmp_path / "out" / "dtype_check.json").read_text())
    cos = res["cosine_to_float32"]
    assert abs(cos["float32"] - 1.0) < 1e-12 and 0.95 < cos["bfloat16"] < 1.0  # the base really ran in bfloat16
    assert abs(cos["float32-ckpt"] - 1.0) < 1e-6  # checkpointing: the same update, up to rounding
    for dtype, r in res["dtypes"].items():
        assert r["peak_mb"] > 0 and r["training_step"]["peak_mb"] > 0 and r["training_step"]["loss"] > 0
        assert abs(r["peak_over_training_step"] - r["peak_mb"] / r["training_step"]["peak_mb"]) < 1e-9
        assert isinstance(r["verified"], bool) and r["memory"]["budget_mb"] > 0
    settings = {v: json.loads((tmp_path / "out" / f"unlearn-{v}" / "unlearn.json").read_text())["settings"]
                for v in ("bfloat16", "float32-ckpt")}
    assert settings["bfloat16"]["dtype"] == "bfloat16" and not settings["bfloat16"]["checkpointing"]
    assert settings["float32-ckpt"]["dtype"] == "float32" and settings["float32-ckpt"]["checkpointing"]


def test_gpu_check_refuses_a_run_folder_without_a_demo(tmp_path):
    """--run names a demo made elsewhere (the lent machine cannot make one without the 98 MB base): a folder without
    one is refused by name before anything runs."""
    import pytest

    from benchmarks.gpu_check import main as gpu_check

    (tmp_path / "run").mkdir()
    with pytest.raises(SystemExit, match="holds no demo"):
        gpu_check(["--device", "cpu", "--skip-tests", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "out")])
