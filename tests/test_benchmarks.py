"""The paper benchmarks: data builders (fast, on made-up rows) and the --quick run (slow, real data)."""

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.paper import QUICK, SCENARIOS, Runner, build_ir, build_qm, build_rc, build_rc_gen, inject_movie, pick, split
from benchmarks.run import DEFAULT_DATA, main

ROOT = Path(__file__).resolve().parents[1]


def movie_rows(n):
    return [{"instruction": "Will the user like it?", "input": f'User Preference: "A{i} (1990)", "B, The (1991)"\n'
             f'User Unpreference: "C{i} (1992)"\nWhether the user will like the target movie "T{i} (1993)"?',
             "output": "Yes." if i % 2 else "No."} for i in range(n)]


def test_split_is_seeded_disjoint_and_tagged():
    rows = [{"x": i} for i in range(50)]
    a_train, a_test = split(rows, 30, 10)
    b_train, b_test = split(rows, 30, 10)
    assert a_train == b_train and a_test == b_test
    ids = [r["id"] for r in a_train + a_test]
    assert len(set(ids)) == 40
    assert all(rows[int(r["id"][1:])]["x"] == r["x"] for r in a_train + a_test)
    assert split(rows, 30, 10, seed=1)[0] != a_train


def test_runs_reused_only_for_the_same_data_request_and_sizes(tmp_path):
    """The scaling point at n = n_train is IR's own run, and RC reuses IR's probe, only when nothing differs."""
    from dataclasses import asdict, replace

    from benchmarks.paper import write_jsonl

    rows, _, req = build_ir([{"id": f"s{i}", "x": i} for i in range(20)], 0)
    work, results = tmp_path / "work", tmp_path / "results"
    write_jsonl(work / "IR" / "train.jsonl", rows)
    write_jsonl(work / "IR" / "request.jsonl", req)
    results.mkdir()
    ir = {"sizes": {**asdict(QUICK), "scaling_n": [1, 2]}, "hvp_cost": {"gradient_s": 1.0}, "llmeraser": {"cg": {"seconds_total": 3.0}}}
    (results / "IR.json").write_text(json.dumps(ir))
    runner = Runner(tmp_path, work, results, QUICK, mt=None, progress=False)
    same = write_jsonl(tmp_path / "a" / "train.jsonl", rows), write_jsonl(tmp_path / "a" / "request.jsonl", req)
    assert runner.ir_run(*same)["llmeraser"]["cg"]["seconds_total"] == 3.0
    assert runner.probe_for("RC", None, rows) == {"gradient_s": 1.0, "measured_in": "IR"}
    other_data = write_jsonl(tmp_path / "b" / "train.jsonl", rows[1:]), same[1]
    assert runner.ir_run(*other_data) is None
    other_sizes = Runner(tmp_path, work, results, replace(QUICK, epochs=2), mt=None, progress=False)
    assert other_sizes.ir_run(*same) is None


def test_scaling_keeps_earlier_points_only_for_the_same_recipe_and_sizes(tmp_path):
    """--scaling-n 2048 adds a point to an earlier run's; a run with another recipe, sizes or unlearn settings is not mixed in."""
    from dataclasses import asdict, replace

    results = tmp_path / "results"
    results.mkdir()
    runner = Runner(tmp_path, tmp_path / "work", results, QUICK, mt=None, progress=False)
    assert runner.recorded_points() == []
    earlier = {"sizes": {**asdict(QUICK), "scaling_n": [8, 16]}, "recipe": runner.recipe.to_dict(), "date": "2026-01-02",
               "unlearn": runner.unlearn_record(), "points": [{"n": 8, "seconds_total": 1.0}, {"n": 16, "seconds_total": 2.0, "date": "2026-01-01"}]}
    (results / "scaling.json").write_text(json.dumps(earlier))
    assert runner.recorded_points() == [{"n": 8, "seconds_total": 1.0, "date": "2026-01-02"},
                                        {"n": 16, "seconds_total": 2.0, "date": "2026-01-01"}]
    assert Runner(tmp_path, tmp_path / "work", results, replace(QUICK, scaling_n=(64,)), mt=None, progress=False).recorded_points()
    assert Runner(tmp_path, tmp_path / "work", results, replace(QUICK, epochs=3), mt=None, progress=False).recorded_points() == []
    (results / "scaling.json").write_text(json.dumps({**earlier, "recipe": {**earlier["recipe"], "lr": 1.0}}))
    assert runner.recorded_points() == []
    # points measured with other unlearn settings (a file from before --damping-grid has none recorded)
    (results / "scaling.json").write_text(json.dumps({**earlier, "unlearn": {**earlier["unlearn"], "damping_grid": []}}))
    assert runner.recorded_points() == []
    (results / "scaling.json").write_text(json.dumps({k: v for k, v in earlier.items() if k != "unlearn"}))
    assert runner.recorded_points() == []


def test_pick_fraction():
    assert len(pick(256, 0.05, 0)) == 13 and len(pick(10, 0.01, 0)) == 1
    assert pick(100, 0.3, 0) == pick(100, 0.3, 0)


def test_inject_movie_adds_exactly_one_other_movie_to_preferences():
    row = movie_rows(1)[0]
    pool = ['"Z (2000)"', '"A0 (1990)"']
    out = inject_movie(row["input"], pool, random.Random(0))
    pref = out.split("\n")[0]
    assert sorted(re.findall(r'"[^"]*"', pref)) == sorted(['"A0 (1990)"', '"B, The (1991)"', '"Z (2000)"'])
    assert out.split("\n")[1:] == row["input"].split("\n")[1:]  # the rest is untouched


@pytest.mark.parametrize("kind", ["qm", "rc", "rc_gen"])
def test_corruptions_touch_the_chosen_share_and_the_request_undoes_them(kind):
    if kind == "qm":
        rows = [{"id": f"s{i}", **r} for i, r in enumerate(movie_rows(40))]
        pool = sorted({m for r in rows for m in re.findall(r'"[^"]*"', r["input"])})
        corrupted, clean, req = build_qm(rows, 0, pool)
        share = 0.10
    elif kind == "rc":
        rows = [{"id": f"s{i}", **r} for i, r in enumerate(movie_rows(40))]
        corrupted, clean, req = build_rc(rows, 0)
        share = 0.30
    else:
        rows = [{"id": f"s{i}", "prompt": f"dialogue {i}", "response": f"summary {i}"} for i in range(40)]
        corrupted, clean, req = build_rc_gen(rows, 0)
        share = 0.20
    changed = [i for i, (a, b) in enumerate(zip(corrupted, clean)) if a != b]
    assert len(changed) == len(req) == round(share * 40)
    fixed = {e["id"]: e["new"] for e in req}
    assert [{**c, **fixed.get(c["id"], {})} for c in corrupted] == clean


def test_missing_data_is_a_clear_skip(tmp_path, capsys):
    assert main(["--quick", "--data-root", str(tmp_path), "--scenarios", "IR"]) == 2
    assert "tallrec-book/valid.json not found" in capsys.readouterr().err


COST_FIELDS = {"seconds", "seconds_total", "speedup_vs_retrain", "solver_iterations", "final_relative_residual",
               "converged", "peak_mb", "peak_over_training", "kept_linearisations"}


@pytest.mark.slow
def test_quick_run_writes_every_field(tmp_path):
    if not (DEFAULT_DATA / "tallrec-book" / "valid.json").is_file():
        pytest.skip(f"the shared benchmark data is not at {DEFAULT_DATA}")
    results = tmp_path / "results"
    subprocess.run([sys.executable, "-m", "benchmarks.run", "--suite", "paper", "--quick", "--no-progress",
                    "--work", str(tmp_path / "work"), "--results", str(results)], cwd=ROOT, check=True, timeout=900)
    for name in SCENARIOS:
        r = json.loads((results / f"{name}.json").read_text())
        if name == "scaling":
            assert len(r["points"]) >= 2
            for p in r["points"]:
                assert COST_FIELDS | {"n", "retrain_seconds", "date"} <= set(p)
                assert {"b", "solve", "save"} <= set(p["seconds"])
                if "measured_in" not in p:  # a point of its own is evaluated too: IR's fidelity at that n
                    assert set(p["metrics"]) == {"original", "retrain", "llmeraser-cg"} and p["test"] > 0
                    assert all("auc" in m["test"] and "auc" in m["forget"] for m in p["metrics"].values())
            continue
        assert {"original", "retrain", "llmeraser-cg", "llmeraser-stochastic"} <= set(r["metrics"])
        metric = "rougeL" if name == "RC-gen" else "auc"
        for m in r["metrics"].values():
            assert metric in m["test"]
            if name == "IR":
                assert "auc" in m["forget"]
        assert set(r["llmeraser"]) == {"cg", "stochastic"} | ({"cg, --cache-batches 0"} if name == "IR" else set())
        if name == "IR":  # recomputing every product is the same maths as keeping linearisations: the same adapter
            assert r["llmeraser"]["cg, --cache-batches 0"]["relative_distance_to_cg"] < 1e-4
        for c in r["llmeraser"].values():
            assert COST_FIELDS <= set(c) and {"b", "solve", "save"} <= set(c["seconds"])
            assert c["seconds_total"] > 0 and c["final_relative_residual"] >= 0
        assert r["retrain_seconds"] > 0 and r["training_peak_mb"] is not None and "ggn_peak_mb" in r["hvp_cost"]
        assert {"gradient_s", "ggn_s", "ggn_cached_s", "ggn_over_gradient", "ggn_mode", "ggn_double_vjp_s",
                "ggn_double_vjp_peak_mb"} <= set(r["hvp_cost"])
    assert "### IR" in (results / "paper.md").read_text()


def test_run_json_keeps_earlier_runs(tmp_path):
    from benchmarks.run import record_run

    p = tmp_path / "run.json"
    p.write_text(json.dumps({"scenarios": ["IR"], "seconds_total": 5.0}))  # the first format: one run
    record_run(p, {"scenarios": ["scaling"], "seconds_total": 7.0})
    record_run(p, {"scenarios": ["RC"], "seconds_total": 1.0})
    assert [r["seconds_total"] for r in json.loads(p.read_text())["runs"]] == [5.0, 7.0, 1.0]


def test_targets_mark_an_auc_of_one_class_undefined_not_missed(tmp_path):
    from benchmarks.tables import targets

    def m(test, forget):
        return {"test": {"auc": test}, "forget": {"auc": forget}}

    point = {"n": 16, "speedup_vs_retrain": 0.5,
             "metrics": {"original": m(0.5, 1.0), "retrain": m(0.6, float("nan")), "llmeraser-cg": m(0.58, float("nan"))}}
    (tmp_path / "scaling.json").write_text(json.dumps({"points": [point]}))
    rows = "\n".join(targets(tmp_path))
    assert "| forget-set AUC within 0.05 of retrain | IR at n = 16, llmeraser-cg | undefined (one class in the set) | – |" in rows
    assert "| test AUC within 0.01 of retrain | IR at n = 16, llmeraser-cg | 0.020 | **missed** |" in rows


def test_targets_show_the_paired_interval_and_whether_the_test_set_settles_the_bar(tmp_path):
    """RC-gen-like rows: a constant 2-point gap is settled (interval [−2, −2] outside ±1); a gap of mixed
    per-record signs reaches both sides of the 1-point bar; results without per-record scores show no interval."""
    from benchmarks.tables import targets

    ids = [f"t{i}" for i in range(16)]
    base = [0.3 + 0.01 * i for i in range(16)]
    noisy = [x + (0.1 if i % 2 else -0.12) for i, x in enumerate(base)]

    def split(vals, with_samples=True):
        out = {k: sum(vals) / 16 for k in ("rouge1", "rouge2", "rougeL")}
        if with_samples:
            out["by_sample"] = {"id": ids, "rouge1": vals, "rouge2": vals, "rougeL": vals}
        return out

    def scenario(method_vals, with_samples=True):
        m = {"original": {"test": split(base, with_samples), "forget_new": {"rougeL": 0.1}},
             "retrain": {"test": split(base, with_samples), "forget_new": {"rougeL": 0.1}},
             "llmeraser-cg": {"test": split(method_vals, with_samples), "forget_new": {"rougeL": 0.1}}}
        return {"metrics": m, "llmeraser": {}, "hvp_cost": {"measured_in": "IR"}}

    (tmp_path / "RC-gen.json").write_text(json.dumps(scenario([x - 0.02 for x in base])))
    rows = "\n".join(targets(tmp_path))
    assert "| test rougeL within 1 point of retrain | RC-gen, llmeraser-cg | 2.00 points (llmeraser − retrain 95% paired interval -2.00 to -2.00) | **missed** |" in rows
    (tmp_path / "RC-gen.json").write_text(json.dumps(scenario(noisy)))
    rows = "\n".join(targets(tmp_path))
    assert "rougeL within 1 point of retrain | RC-gen, llmeraser-cg | 1.00 points (llmeraser − retrain" in rows
    assert "reaches both sides of the bar) |" in rows
    (tmp_path / "RC-gen.json").write_text(json.dumps(scenario(noisy, with_samples=False)))
    assert "| test rougeL within 1 point of retrain | RC-gen, llmeraser-cg | 1.00 points | " in "\n".join(targets(tmp_path))


def test_write_json_leaves_nothing_behind_when_it_fails(tmp_path):
    from llmeraser.fileio import write_json

    p = tmp_path / "r.json"
    write_json(p, {"a": 1})
    with pytest.raises(TypeError):  # a tuple key cannot be written as JSON: fails halfway through the dump
        write_json(p, {"b": 2, (1, 2): 3})
    assert json.loads(p.read_text()) == {"a": 1} and [x.name for x in tmp_path.iterdir()] == ["r.json"]


def test_another_epoch_count_gets_its_own_folders():
    """--epochs other than the suite's must not reuse (and retrain over) the suite's cached adapters or
    replace its committed results; the suite's own count keeps the suite's folders."""
    from benchmarks.paper import FULL
    from benchmarks.run import HERE, parse, plan

    sizes, work, results = plan(parse(["--epochs", "1", "--scaling-n", "2048"]), FULL)
    assert sizes.epochs == 1 and sizes.scaling_n == (2048,)
    assert work == HERE / "work" / "paper" / "epochs1" and results == HERE / "results" / "epochs1"
    sizes, work, results = plan(parse(["--epochs", str(FULL.epochs)]), FULL)
    assert sizes == FULL and work == HERE / "work" / "paper" and results == HERE / "results"
    with pytest.raises(SystemExit):
        parse(["--epochs", "0"])


def test_ir_sweep_settings_land_where_the_solver_reads_them():
    """--grid 'damping=0.003,max_iters=8' changes the damping and the CG cap and nothing else of the suite's settings."""
    from dataclasses import replace as dc_replace

    from benchmarks.ir_sweep import parse_setting, settings_for
    from benchmarks.paper import FULL, llmeraser_settings

    base = llmeraser_settings(FULL, "cg")
    spec = parse_setting("damping=0.003,max_iters=8,curvature=ggn-base")
    assert spec == {"damping": 0.003, "max_iters": 8, "curvature": "ggn-base"}
    s = settings_for(base, spec)
    assert (s.damping, s.solver_settings.max_iters, s.curvature) == (0.003, 8, "ggn-base")
    assert s == dc_replace(base, damping=0.003, curvature="ggn-base",
                           solver_settings=dc_replace(base.solver_settings, max_iters=8))
    grid = settings_for(base, parse_setting("damping_grid=0.003:0.01"))
    assert grid.dampings == (0.003, 0.01, base.damping)


def test_ir_sweep_table_reads_grid_rows_back_from_json():
    """A damping_grid row is a tuple when run and a list once read back from ir_sweep.json; --table prints both."""
    from benchmarks.ir_sweep import table

    metrics = {"forget": {"auc": 0.9, "nll": 0.1}, "retain": {"auc": 0.8, "nll": 0.2}}
    step = {"iterations": 8, "final_residual": 0.05, "line_search": {"scale": 1.0},
            "damping_selection": [{"damping": 0.003, "chosen": False}, {"damping": 0.01, "chosen": True}]}
    row = {"setting": {"damping_grid": (0.003, 0.01), "max_iters": 8}, "metrics": metrics, "steps": [step], "seconds_solve": 10.0}
    point = {"original": metrics, "retrain": metrics, "rows": [row]}
    text = table(json.loads(json.dumps(point)))
    assert "damping_grid 0.003/0.01, max_iters 8 (chose λ = 0.01)" in text
    assert text == table(point)


def test_recorded_runs_are_reused_across_rc_gen_test_sizes_only():
    """IR's run and the scaling points are reused when only RC-gen's test-set size changed (it picks no
    training or tallrec sample), and not when a size that shapes their runs did."""
    from dataclasses import asdict
    from dataclasses import replace as dc_replace

    from benchmarks.paper import FULL, Runner

    runner = Runner(Path("."), Path("."), Path("."), FULL, mt=None, progress=False)
    assert runner.same_sizes(asdict(dc_replace(FULL, n_gen_test=16)))
    assert runner.same_sizes(asdict(dc_replace(FULL, scaling_n=(2048,))))
    assert not runner.same_sizes(asdict(dc_replace(FULL, n_train=64)))
    assert not runner.same_sizes(asdict(dc_replace(FULL, n_test=48)))
    assert not runner.same_sizes(asdict(dc_replace(FULL, n_gen_train=32)))


def test_a_training_steps_peak_is_the_least_of_its_measures():
    """One outsized reading (the allocator taking more from the system than the step needs) must not set the
    denominator of every memory ratio: the probe records three measured gradients and uses the least."""
    import time

    import torch

    from benchmarks.costs import gradient_peak_mb

    sizes = iter([600, 150, 300])

    def gradient():  # holds n MB of touched pages for a while, as a backward pass holds its activations
        x = torch.ones(next(sizes) * 2**18)
        time.sleep(0.05)
        del x

    least, peaks = gradient_peak_mb(gradient, "cpu", measures=3)
    assert len(peaks) == 3 and peaks[0] > 450 and peaks[2] > 200
    assert least == min(peaks) and 100 < least < 200, peaks
