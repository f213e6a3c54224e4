"""The written adapter: round trip, metadata, atomic output, inputs left intact."""

import hashlib
import json

import pytest
import torch

from llmeraser.cli import main
from llmeraser.modeling import load_adapter

from helpers import load_tiny, write_jsonl


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def logits(base_dir, adapter_dir, text="phone of ann?"):
    model, tok = load_tiny(base_dir)
    peft_model = load_adapter(model, adapter_dir)
    with torch.no_grad():
        return peft_model(**tok(text, return_tensors="pt")).logits


def run_cli(tiny_dir, request, out, *extra):
    return main(["unlearn", "--base", str(tiny_dir / "base"), "--adapter", str(tiny_dir / "adapter"),
                 "--data", str(tiny_dir / "train.jsonl"), "--request", str(request), "--out", str(out),
                 "--device", "cpu", "--quiet", *extra])


@pytest.mark.parametrize("edit", [
    {"op": "modify_query", "id": "r2", "new": {"prompt": "phone of cy?"}},
    {"op": "correct_response", "id": "r5", "new": {"response": None}},  # filled in below
])
def test_identity_edit_gives_zero_delta_and_identical_logits(tiny_dir, tmp_path, edit):
    rows = [json.loads(line) for line in (tiny_dir / "train.jsonl").read_text().splitlines()]
    if edit["op"] == "correct_response":
        edit["new"]["response"] = rows[5]["response"]
    assert edit["new"] == {k: rows[int(edit["id"][1:])][k] for k in edit["new"]}  # new equals old
    req = write_jsonl(tmp_path / "req.jsonl", [edit])
    assert run_cli(tiny_dir, req, tmp_path / "out") == 0
    meta = json.loads((tmp_path / "out" / "unlearn.json").read_text())
    assert meta["rhs_norm"] == 0.0 and meta["delta_norm"] == 0.0
    assert torch.equal(logits(tiny_dir / "base", tiny_dir / "adapter"), logits(tiny_dir / "base", tmp_path / "out"))


def test_output_adapter_and_metadata(tiny_dir, tmp_path):
    before = digest(tiny_dir / "adapter")
    data_before = digest(tiny_dir)["train.jsonl"]
    req = write_jsonl(tmp_path / "req.jsonl", [{"op": "remove", "id": "r3"},
                                               {"op": "correct_response", "id": "r4", "new": {"response": "1234"}}])
    out = tmp_path / "new_adapter"
    assert run_cli(tiny_dir, req, out, "--damping", "0.1") == 0
    assert digest(tiny_dir / "adapter") == before and digest(tiny_dir)["train.jsonl"] == data_before
    assert (out / "adapter_config.json").read_bytes() == (tiny_dir / "adapter" / "adapter_config.json").read_bytes()
    meta = json.loads((out / "unlearn.json").read_text())
    for key in ("request", "n", "affected", "solver", "settings", "seconds", "peak_memory_mb", "versions"):
        assert key in meta
    assert meta["request"]["sha256"] == hashlib.sha256(req.read_bytes()).hexdigest()
    assert meta["n"] == 12 and meta["affected"] == 2
    assert set(meta["seconds"]) == {"load", "b", "solve", "verify", "save"}
    assert meta["solver"]["residuals"][0] == [0, 1.0]
    assert meta["delta_norm"] > 0
    # the new adapter loads with PEFT and differs from the old one
    assert not torch.equal(logits(tiny_dir / "base", tiny_dir / "adapter"), logits(tiny_dir / "base", out))
    # no temporary folders left behind
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_existing_out_is_refused_unless_overwrite(tiny_dir, tmp_path, capsys):
    req = write_jsonl(tmp_path / "req.jsonl", [{"op": "remove", "id": "r3"}])
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert run_cli(tiny_dir, req, out) == 2
    assert "already exists" in capsys.readouterr().err
    assert run_cli(tiny_dir, req, out, "--overwrite") == 2  # not a folder llmeraser wrote
    assert "replaces only a folder llmeraser wrote" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    out.rmdir()
    assert run_cli(tiny_dir, req, out) == 0
    first = (out / "unlearn.json").read_text()
    assert run_cli(tiny_dir, req, out) == 2  # an llmeraser output, but no --overwrite
    assert run_cli(tiny_dir, req, out, "--overwrite", "--damping", "0.5") == 0
    assert (out / "unlearn.json").read_text() != first
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_out_equal_to_adapter_is_refused(tiny_dir, tmp_path, capsys):
    req = write_jsonl(tmp_path / "req.jsonl", [{"op": "remove", "id": "r3"}])
    before = digest(tiny_dir / "adapter")
    assert run_cli(tiny_dir, req, tiny_dir / "adapter", "--overwrite") == 2
    assert "also an input" in capsys.readouterr().err
    assert digest(tiny_dir / "adapter") == before


def test_newton_refinement_descends_on_the_edited_objective(tiny64, tmp_path):
    """Extra Newton steps start from the paper's update and only accept steps that lower R'."""
    from llmeraser.data import load_request
    from llmeraser.solvers import SolverSettings
    from llmeraser.settings import UnlearnSettings
    from llmeraser.unlearner import Unlearner

    model, tok, records = tiny64
    req = load_request(write_jsonl(tmp_path / "r.jsonl", [{"op": "remove", "id": "r1"},
                                                         {"op": "correct_response", "id": "r2", "new": {"response": "9"}}]), records)

    def run(steps, refine_iters=0):
        s = UnlearnSettings(damping=0.5, newton_steps=steps, curvature_samples=0, device="cpu", template="chat",
                            refine_iters=refine_iters, solver_settings=SolverSettings(tol=1e-6, max_iters=200))
        return Unlearner(model, tok, records, s).delta(req, progress=False)

    one, _, _ = run(1)
    three, _, stage = run(3)
    steps = stage["steps"]
    assert len(steps) >= 2 and steps[0]["step"] == 1
    searches = [s["line_search"] for s in steps[1:]]
    accepted = [ls for ls in searches if ls["accepted"]]
    for ls in accepted:  # a refinement step is taken only where it lowers the edited objective
        chosen = next(t["objective"] for t in ls["trace"] if t["scale"] == ls["scale"])
        assert chosen < ls["start"] and ls["slope"] < 0
    starts = [ls["start"] for ls in searches]  # each step starts where the last one ended, lower
    assert starts == sorted(starts, reverse=True)
    if accepted:
        assert not torch.equal(one, three)
    else:
        assert torch.equal(one, three)
    # --refine-iters caps the solver in the steps after the first only
    capped = run(3, refine_iters=1)[2]["steps"]
    assert capped[0]["iterations"] == steps[0]["iterations"] > 1
    assert all(st["iterations"] == 1 for st in capped[1:]) and len(capped) >= 2


def test_unconverged_solve_warns_unless_a_capped_refinement_step(tiny_dir, tmp_path, capsys):
    """A first step stopped short of --tol is reported; later steps capped by --refine-iters stop by design."""
    req = write_jsonl(tmp_path / "req.jsonl", [{"op": "correct_response", "id": "r4", "new": {"response": "1234"}}])
    # --quiet silences progress bars, not warnings
    assert run_cli(tiny_dir, req, tmp_path / "a", "--max-iters", "1", "--tol", "1e-12") == 3
    err = capsys.readouterr().err  # the check failed, so it does not judge the edit, and the fix names --verify until
    assert "in Newton step 1 the solver stopped" in err and "--verify until" in err and not (tmp_path / "a").exists()
    assert run_cli(tiny_dir, req, tmp_path / "a", "--max-iters", "1", "--tol", "1e-12", "--allow-unconverged") == 0
    assert "in Newton step 1 the solver stopped" in capsys.readouterr().err
    config = tmp_path / "refine.toml"
    config.write_text("newton_steps = 2\nrefine_iters = 1\n")  # research settings come through a config
    assert run_cli(tiny_dir, req, tmp_path / "b", "--max-iters", "300", "--tol", "1e-3", "--config", str(config)) == 0
    meta = json.loads((tmp_path / "b" / "unlearn.json").read_text())
    assert meta["newton_steps"][0]["converged"] and not meta["newton_steps"][1]["converged"]
    assert "stopped" not in capsys.readouterr().err


def test_under_verify_until_the_checks_judge_an_unconverged_solve(tiny_dir, tmp_path, capsys):
    """The memorised recipe runs --verify until: its adapter is written whatever a solve's residual (with only a
    failing check such a solve writes nothing, exit 3: the test above), converged: false is recorded, and the exit
    status is the checks' verdict; the config's verify_steps bounds the extra steps."""
    req = write_jsonl(tmp_path / "req.jsonl", [{"op": "correct_response", "id": "r4", "new": {"response": "1234"}}])
    config = tmp_path / "budget.toml"
    config.write_text("verify_steps = 1\n")
    code = run_cli(tiny_dir, req, tmp_path / "u", "--recipe", "memorised", "--config", str(config), "--max-iters", "1",
                   "--tol", "1e-12")
    meta = json.loads((tmp_path / "u" / "unlearn.json").read_text())
    v = meta["verification"]
    assert meta["settings"]["verify"] == "until" and meta["settings"]["verify_steps"] == 1
    assert meta["converged"] is False and meta["newton_steps"][0]["final_residual"] > 1e-12
    assert len(v["extra_steps"]) <= 1 and code == (0 if v["verified"] else 4)
    assert "written although a solve stopped above tol" in capsys.readouterr().err


def test_the_new_adapter_carries_no_file_of_the_old_folder_but_an_adapters(tiny_dir, tmp_path, capsys):
    """Data kept in the adapter's folder (the records being forgotten, a request with their private values) does not
    travel to the new adapter: only the config, README and tokenizer files are copied, and the others are named."""
    import shutil

    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_dir / "adapter", adapter)
    shutil.copy(tiny_dir / "train.jsonl", adapter / "train.jsonl")
    req = write_jsonl(adapter / "req.jsonl", [{"op": "remove", "id": "r3"}])
    (adapter / "README.md").write_text("model card\n")
    (adapter / "tokenizer_config.json").write_text("{}\n")
    out = tmp_path / "new"
    code = main(["unlearn", "--base", str(tiny_dir / "base"), "--adapter", str(adapter), "--data", str(adapter / "train.jsonl"),
                 "--request", str(req), "--out", str(out), "--device", "cpu", "--damping", "0.1"])
    assert code == 0
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "tokenizer_config.json"} <= names
    assert not names & {"train.jsonl", "req.jsonl"}
    assert "not copied from" in capsys.readouterr().err


def test_negative_curvature_is_recorded_per_step_and_warned(tiny_dir, tmp_path, capsys):
    """The true Hessian at the tiny adapter is indefinite: undamped, CG meets pᵀCp ≤ 0. The step keeps CG's last
    iterate (b itself at the first iteration, never a zero step), its record says where, and unlearn warns."""
    req = write_jsonl(tmp_path / "req.jsonl", [{"op": "correct_response", "id": "r4", "new": {"response": "1234"}}])
    config = tmp_path / "hessian.toml"
    config.write_text('curvature = "hessian"\n')
    assert run_cli(tiny_dir, req, tmp_path / "a", "--damping", "0", "--tol", "1e-10", "--max-iters", "300",
                   "--config", str(config), "--allow-unconverged") == 0
    meta = json.loads((tmp_path / "a" / "unlearn.json").read_text())
    step = meta["newton_steps"][0]
    assert step["negative_curvature_at"] >= 1 and not step["converged"] and meta["delta_norm"] > 0
    assert f"CG met negative curvature at iteration {step['negative_curvature_at']}" in capsys.readouterr().err
