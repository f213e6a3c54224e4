"""Hostile inputs: one case a test. Each asserts the exit code, a message naming the problem and its fix,
that nothing was written, and that every input file is byte for byte as it was.

The data-loss cases come first: no `--out` may replace, contain or write into an input, for any command.
"""

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmeraser.cli import main
from llmeraser.fileio import MARKER

from helpers import write_jsonl


def hashes(*roots) -> dict:
    """SHA-256 of every file under each root (symlinks not followed)."""
    out = {}
    for root in roots:
        for p in sorted(Path(root).rglob("*")):
            if p.is_file() and not p.is_symlink():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture
def proj(tiny_dir, tmp_path):
    """A user's project folder: a copy of the tiny base, adapter (with a train.json) and data, and a request."""
    p = tmp_path / "proj"
    shutil.copytree(tiny_dir / "base", p / "base")
    shutil.copytree(tiny_dir / "adapter", p / "adapter")
    shutil.copy(tiny_dir / "train.jsonl", p / "train.jsonl")
    write_jsonl(p / "req.jsonl", [{"op": "remove", "id": "r1"}])
    data_sha = hashlib.sha256((p / "train.jsonl").read_bytes()).hexdigest()
    (p / "adapter" / "train.json").write_text(json.dumps(
        {"arguments": {"rank": 2, "alpha": 4.0, "target_modules": ["q_proj", "v_proj"], "epochs": 1.0, "lr": 1e-3,
                       "batch_size": 4, "weight_decay": 0.0, "max_length": 512, "template": "auto", "seed": 0},
         "n": 12, "data_sha256": data_sha}))
    return p


@pytest.fixture
def no_compute(monkeypatch):
    """Fail the test if the long computation (solve, training) starts: the input was to be refused before it."""
    def boom(*a, **k):
        raise AssertionError("the computation started before the bad input was refused")

    monkeypatch.setattr("llmeraser.unlearner.Unlearner.delta", boom)
    monkeypatch.setattr("llmeraser.baselines.train_lora", boom)
    monkeypatch.setattr("llmeraser.evaluate.AdapterEval.scored", boom)


def unlearn_args(p, out, *extra, adapter=None, data=None, request=None, base=None):
    return ["unlearn", "--base", str(base or p / "base"), "--adapter", str(adapter or p / "adapter"),
            "--data", str(data or p / "train.jsonl"), "--request", str(request or p / "req.jsonl"), "--out", str(out),
            "--device", "cpu", "--quiet", "--max-iters", "5", "--allow-unconverged", *extra]


def refused(args, capsys, watched, message, code=2):
    """Run the CLI; assert the exit code, the message, and that no file under `watched` changed or appeared."""
    before = hashes(*watched)
    assert main(args) == code
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err
    assert hashes(*watched) == before
    return err


# ---- data loss: an output can never be, contain or sit inside an input ----

def test_out_containing_the_adapter_is_refused_with_overwrite(proj, capsys, no_compute):
    refused(unlearn_args(proj, proj, "--overwrite"), capsys, [proj.parent], "contains the input")


def test_out_dot_from_the_inputs_folder_is_refused(proj, capsys, no_compute, monkeypatch):
    monkeypatch.chdir(proj)
    args = ["unlearn", "--base", "base", "--adapter", "adapter", "--data", "train.jsonl", "--request", "req.jsonl",
            "--out", ".", "--overwrite", "--device", "cpu", "--quiet"]
    refused(args, capsys, [proj.parent], "contains the input")


def test_out_inside_the_adapter_is_refused(proj, capsys, no_compute):
    refused(unlearn_args(proj, proj / "adapter" / "new"), capsys, [proj.parent], "lies inside the input folder")
    assert not (proj / "adapter" / "new").exists()


def test_out_through_a_symlink_into_the_adapter_is_refused(proj, tmp_path, capsys, no_compute):
    link = tmp_path / "link"
    link.symlink_to(proj / "adapter", target_is_directory=True)
    refused(unlearn_args(proj, link / "new"), capsys, [proj], "lies inside the input folder")
    refused(unlearn_args(proj, link, "--overwrite"), capsys, [proj], "is also an input")


def test_out_inside_the_base_model_folder_is_refused(proj, capsys, no_compute):
    refused(unlearn_args(proj, proj / "base" / "edit"), capsys, [proj], "lies inside the input folder")


def test_overwrite_refuses_a_folder_llmeraser_did_not_write(proj, tmp_path, capsys, no_compute):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    refused(unlearn_args(proj, mine, "--overwrite"), capsys, [proj, mine], "replaces only a folder llmeraser wrote")


def test_overwrite_refuses_an_output_holding_a_file_the_user_added(proj, tmp_path, capsys):
    out = tmp_path / "edit"
    assert main(unlearn_args(proj, out)) == 0
    assert (out / MARKER).is_file()
    (out / "notes.txt").write_text("mine")
    before = hashes(out)
    assert main(unlearn_args(proj, out, "--overwrite")) == 2
    assert "holds notes.txt, which llmeraser did not write there" in capsys.readouterr().err
    assert hashes(out) == before
    (out / "notes.txt").unlink()
    weights = out / "adapter_model.safetensors"
    kept = weights.read_bytes()
    save_file({k: v + 1 for k, v in load_file(str(weights)).items()}, str(weights))  # e.g. trained further in place
    assert main(unlearn_args(proj, out, "--overwrite")) == 2
    assert "adapter_model.safetensors, which llmeraser did not write there or which changed since" in capsys.readouterr().err
    weights.write_bytes(kept)  # the control: llmeraser's own output, unchanged, is replaced
    assert main(unlearn_args(proj, out, "--overwrite", "--damping", "0.5")) == 0
    assert json.loads((out / "unlearn.json").read_text())["damping"] == 0.5


def test_train_out_containing_the_data_is_refused(proj, capsys, no_compute):
    args = ["train", "--base", str(proj / "base"), "--data", str(proj / "train.jsonl"), "--out", str(proj),
            "--overwrite", "--device", "cpu", "--quiet"]
    refused(args, capsys, [proj.parent], "contains the input")


def test_baseline_out_containing_the_adapter_is_refused(proj, capsys, no_compute):
    args = ["baseline", "retrain", "--base", str(proj / "base"), "--adapter", str(proj / "adapter"),
            "--data", str(proj / "train.jsonl"), "--request", str(proj / "req.jsonl"), "--out", str(proj),
            "--overwrite", "--device", "cpu", "--quiet"]
    refused(args, capsys, [proj.parent], "contains the input")


def test_evaluate_out_inside_an_adapter_is_refused(proj, capsys, no_compute):
    args = ["evaluate", "--base", str(proj / "base"), "--data", str(proj / "train.jsonl"), "--request",
            str(proj / "req.jsonl"), "--adapter", f"original={proj / 'adapter'}", "--out", str(proj / "adapter" / "report"),
            "--device", "cpu", "--quiet"]
    refused(args, capsys, [proj.parent], "lies inside the input folder")


def test_retrain_writes_no_copy_of_the_data_and_leaves_user_files(proj, tmp_path, capsys):
    """The edited training data is never written to disk; a user file with the old temporary name stays."""
    decoy = tmp_path / ".retrain.data.jsonl"
    decoy.write_text("the user's own file")
    (proj / "adapter" / "train.json").write_text(json.dumps({"arguments": {
        "rank": 2, "alpha": 4.0, "target_modules": ["q_proj"], "epochs": 0.5, "batch_size": 4, "seed": 0}}))
    args = ["baseline", "retrain", "--base", str(proj / "base"), "--adapter", str(proj / "adapter"),
            "--data", str(proj / "train.jsonl"), "--request", str(proj / "req.jsonl"), "--out", str(tmp_path / "retrain"),
            "--device", "cpu", "--quiet"]
    assert main(args) == 0
    assert decoy.read_text() == "the user's own file"
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == [".retrain.data.jsonl", "proj", "retrain"]
    meta = json.loads((tmp_path / "retrain" / "train.json").read_text())
    kept = [json.loads(line) for line in (proj / "train.jsonl").read_text().splitlines()][:1] + \
           [json.loads(line) for line in (proj / "train.jsonl").read_text().splitlines()][2:]
    assert meta["n"] == 11
    assert meta["data_sha256"] == hashlib.sha256("".join(json.dumps(r) + "\n" for r in kept).encode()).hexdigest()


# ---- failures found before any computation ----

def test_out_under_a_file_is_refused(proj, capsys, no_compute):
    refused(unlearn_args(proj, proj / "train.jsonl" / "new"), capsys, [proj.parent], "is a file, so no folder can be made")


def cannot_write_in(folder: str) -> bool:
    try:
        fd, probe = tempfile.mkstemp(dir=folder)
    except OSError:
        return os.path.isdir(folder)
    os.close(fd)
    os.unlink(probe)
    return False


@pytest.mark.skipif(not cannot_write_in("/sys"), reason="needs a folder this user cannot write in (/sys on Linux)")
def test_unwritable_out_is_refused_before_loading(proj, capsys, no_compute):
    refused(unlearn_args(proj, "/sys/llmeraser-out"), capsys, [proj], "cannot write in /sys")


def test_adapter_missing_a_tensor_is_refused_before_the_solve(proj, capsys, no_compute):
    f = proj / "adapter" / "adapter_model.safetensors"
    weights = load_file(str(f))
    dropped = sorted(weights)[0]
    del weights[dropped]
    save_file(weights, str(f))
    refused(unlearn_args(proj, proj.parent / "out"), capsys, [proj.parent], "lacks 1 of the")


def test_evaluate_name_with_a_slash_is_refused(proj, capsys, no_compute):
    args = ["evaluate", "--base", str(proj / "base"), "--data", str(proj / "train.jsonl"), "--request",
            str(proj / "req.jsonl"), "--adapter", f"a/b={proj / 'adapter'}", "--out", str(proj.parent / "report"),
            "--device", "cpu", "--quiet"]
    refused(args, capsys, [proj.parent], "a name may hold only letters")


# ---- messages, not tracebacks ----

def test_non_utf8_data(proj, capsys, no_compute):
    (proj / "train.jsonl").write_bytes((proj / "train.jsonl").read_bytes().replace(b"ann", b"\xe9nn"))
    refused(unlearn_args(proj, proj.parent / "out", "--allow-other-data"), capsys, [proj.parent], "train.jsonl:1: not UTF-8 text")


def test_non_utf8_request(proj, capsys, no_compute):
    (proj / "req.jsonl").write_bytes(b'{"op": "remove", "id": "r1"}\n{"op": "remove", "id": "\xff"}\n')
    refused(unlearn_args(proj, proj.parent / "out"), capsys, [proj.parent], "req.jsonl:2: not UTF-8 text")


@pytest.mark.parametrize("line, message", [
    ("[" * 200000 + "]" * 200000, "req.jsonl:1: malformed JSON (RecursionError"),
    ('{"op": "remove", "id": ' + "7" * 5000 + "}", "req.jsonl:1: malformed JSON (ValueError"),
])
def test_json_that_python_cannot_parse_is_named(proj, capsys, no_compute, line, message):
    """Nesting past the recursion limit and an integer past Python's digit limit are not JSONDecodeErrors: they get
    the malformed-JSON message too, not a traceback."""
    (proj / "req.jsonl").write_text(line + "\n")
    refused(unlearn_args(proj, proj.parent / "out"), capsys, [proj.parent], message)


def test_a_folder_given_as_the_request_is_named_as_one(proj, capsys, no_compute):
    (proj / "reqs").mkdir()
    refused(unlearn_args(proj, proj.parent / "out", request=proj / "reqs"), capsys, [proj.parent],
            "is a folder; give the request file in it")


def test_a_byte_order_mark_is_read_past(tmp_path):
    """Windows editors start a UTF-8 file with U+FEFF: the records load as without it, as JSONL and as a JSON array."""
    from llmeraser.data import load_records

    rows = [{"id": "a", "prompt": "p", "response": "r"}, {"id": "b", "prompt": "q", "response": "s"}]
    (tmp_path / "d.jsonl").write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in rows).encode())
    (tmp_path / "d.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(rows).encode())
    for name in ("d.jsonl", "d.json"):
        assert [r.id for r in load_records(tmp_path / name)] == ["a", "b"]


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_damaged_adapter_safetensors(proj, capsys, no_compute, damage):
    f = proj / "adapter" / "adapter_model.safetensors"
    data = f.read_bytes()
    f.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "garbage": b"not a tensor file" * 9}[damage])
    err = refused(unlearn_args(proj, proj.parent / "out"), capsys, [proj.parent], "is not a readable safetensors file")
    assert "adapter_model.safetensors" in err


def test_truncated_base_safetensors(proj, capsys, no_compute):
    f = proj / "base" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    err = refused(unlearn_args(proj, proj.parent / "out"), capsys, [proj.parent], "--base: ")
    assert "model.safetensors is not a readable safetensors file" in err


def test_unknown_device(proj, capsys, no_compute):
    refused(unlearn_args(proj, proj.parent / "out", "--device", "gpu0"), capsys, [proj.parent], "--device gpu0: unknown device")


def test_check_every_zero_in_a_config(proj, tmp_path, capsys, no_compute):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"solver": "stochastic", "solver_settings": {"check_every": 0}}))
    refused(unlearn_args(proj, tmp_path / "out", "--config", str(config)), capsys, [tmp_path], "check_every 0: give an integer >= 1")


def test_unknown_setting_in_a_config(proj, tmp_path, capsys, no_compute):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"dampnig": 0.1}))
    refused(unlearn_args(proj, tmp_path / "out", "--config", str(config)), capsys, [tmp_path], "unknown settings ['dampnig']")


@pytest.mark.parametrize("wd, message", [(-0.1, "weight_decay = -0.1"), ("NaN", "weight_decay = nan")])
def test_bad_weight_decay_in_train_json(proj, capsys, no_compute, wd, message):
    meta = json.loads((proj / "adapter" / "train.json").read_text())
    meta["arguments"]["weight_decay"] = float(wd)
    (proj / "adapter" / "train.json").write_text(json.dumps(meta))
    refused(unlearn_args(proj, proj.parent / "out"), capsys, [proj.parent], message)


def test_malformed_train_json(proj, capsys, no_compute):
    (proj / "adapter" / "train.json").write_text('{"arguments": ')
    refused(unlearn_args(proj, proj.parent / "out"), capsys, [proj.parent], "train.json: not valid JSON")


@pytest.mark.parametrize("name", ["train.json", "adapter_config.json"])
def test_an_unreadable_adapter_file_is_named(proj, capsys, no_compute, monkeypatch, name):
    """A permission error (simulated: the tests run as root, whom chmod does not stop) names the file, not a traceback.
    Only llmeraser's reads are refused; the test's own hashing of the folder reads as usual."""
    import sys

    real = Path.read_bytes

    def read_bytes(self):
        if self.name == name and sys._getframe(1).f_globals.get("__name__", "").startswith("llmeraser"):
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    refused(unlearn_args(proj, proj.parent / "out"), capsys, [proj.parent], f"{name}: cannot be read (Permission denied)")


def test_pickled_adapter_is_refused_and_never_loaded(proj, capsys, no_compute, monkeypatch):
    f = proj / "adapter" / "adapter_model.safetensors"
    torch.save(load_file(str(f)), proj / "adapter" / "adapter_model.bin")
    f.unlink()
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("a pickle was loaded"))
    err = refused(unlearn_args(proj, proj.parent / "out"), capsys, [proj.parent], "its weights are a pickle")
    assert "save_file(torch.load(" in err  # says how to convert


def test_pickled_base_is_refused(proj, capsys, no_compute, monkeypatch):
    f = proj / "base" / "model.safetensors"
    torch.save(load_file(str(f)), proj / "base" / "pytorch_model.bin")
    f.unlink()
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("a pickle was loaded"))
    refused(unlearn_args(proj, proj.parent / "out"), capsys, [proj.parent], "its weights are a pickle (pytorch_model.bin)")


# ---- wrong results are refused, not written with exit 0 ----

def test_data_other_than_the_adapters_training_data(proj, tmp_path, capsys, no_compute):
    other = write_jsonl(tmp_path / "other.jsonl", [json.loads(line) for line in (proj / "train.jsonl").read_text().splitlines()][:10])
    refused(unlearn_args(proj, tmp_path / "out", data=other), capsys, [proj.parent],
            "is not the data this adapter was trained on")


def test_other_data_with_the_flag_is_used(proj, tmp_path, capsys):
    rows = [json.loads(line) for line in (proj / "train.jsonl").read_text().splitlines()]
    other = tmp_path / "same.json"
    other.write_text(json.dumps(rows))  # the same records as a JSON array: another SHA-256
    assert main(unlearn_args(proj, tmp_path / "out", data=other)) == 2
    assert "--allow-other-data" in capsys.readouterr().err
    assert main(unlearn_args(proj, tmp_path / "out", "--allow-other-data", data=other)) == 0


def test_diverging_training_is_an_error(proj, tmp_path, capsys):
    args = ["train", "--base", str(proj / "base"), "--data", str(proj / "train.jsonl"), "--out", str(tmp_path / "t"),
            "--lr", "1e30", "--epochs", "2", "--batch-size", "4", "--device", "cpu", "--quiet"]
    refused(args, capsys, [proj.parent], "training diverged and nothing was written; lower --lr")


def test_train_final_loss_is_the_loss_of_the_written_adapter(proj, tmp_path):
    from llmeraser.baselines import train
    from llmeraser.data import load_records
    from llmeraser.modeling import load_adapter, load_base
    from llmeraser.train import TrainSettings, mean_loss

    settings = TrainSettings(epochs=2, lr=1e-2, batch_size=4, target_modules=("q_proj",), weight_decay=0.1)
    out = train(str(proj / "base"), proj / "train.jsonl", tmp_path / "t", settings, device="cpu", progress=False)
    meta = json.loads((out / "train.json").read_text())
    model = load_adapter(load_base(str(proj / "base"))[0], out)
    fresh = mean_loss(model, load_base(str(proj / "base"))[1], load_records(proj / "train.jsonl"), settings)
    assert meta["final_loss"] == pytest.approx(fresh, rel=1e-5)
    assert meta["final_loss"] != meta["loss_history"][-1]  # the history's last entry is from before the last update


@pytest.mark.parametrize("grid", ["Infinity", "NaN"])
def test_non_finite_damping_grid_in_a_config(proj, tmp_path, capsys, no_compute, grid):
    config = tmp_path / "c.json"
    config.write_text('{"damping_grid": [%s]}' % grid)  # JSON as Python reads it: Infinity and NaN parse
    refused(unlearn_args(proj, tmp_path / "out", "--config", str(config)), capsys, [tmp_path],
            "every λ must be a finite number >= 0")


def test_non_finite_damping_flag(proj, tmp_path, capsys, no_compute):
    refused(unlearn_args(proj, tmp_path / "out", "--damping", "inf"), capsys, [tmp_path],
            "--damping inf: give a finite number >= 0")


def test_truncated_new_versions_are_counted(proj, tmp_path):
    write_jsonl(proj / "req.jsonl", [{"op": "correct_response", "id": "r1", "new": {"response": "9" * 80}}])
    assert main(unlearn_args(proj, tmp_path / "out", "--max-length", "60")) == 0
    meta = json.loads((tmp_path / "out" / "unlearn.json").read_text())
    assert meta["truncated_new_versions"] == 1 and meta["truncated_samples"] == 1  # the training records fit in 60


def test_baseline_steps_zero(proj, tmp_path, capsys, no_compute):
    args = ["baseline", "gradient-ascent", "--base", str(proj / "base"), "--adapter", str(proj / "adapter"),
            "--data", str(proj / "train.jsonl"), "--request", str(proj / "req.jsonl"), "--out", str(tmp_path / "ga"),
            "--steps", "0", "--device", "cpu", "--quiet"]
    refused(args, capsys, [tmp_path], "--steps 0: give an integer >= 1")


def test_unconverged_solve_exits_3_and_writes_nothing(proj, tmp_path, capsys):
    write_jsonl(proj / "req.jsonl", [{"op": "correct_response", "id": "r4", "new": {"response": "1234"}}])
    args = [a for a in unlearn_args(proj, tmp_path / "out", "--max-iters", "1", "--tol", "1e-12") if a != "--allow-unconverged"]
    refused(args, capsys, [tmp_path], "the solve did not converge", code=3)
    assert main(args + ["--allow-unconverged"]) == 0
    assert json.loads((tmp_path / "out" / "unlearn.json").read_text())["converged"] is False


def test_a_file_system_error_mid_run_is_said_plainly(proj, capsys, monkeypatch):
    """A full disk while saving (simulated in the output's write) ends with a message and status 2, not a traceback,
    and leaves no output or staging folder."""
    import llmeraser.api as api

    def full(*a, **k):
        raise OSError(28, "No space left on device", str(proj.parent / "out" / "adapter_model.safetensors"))

    monkeypatch.setattr(api, "write_adapter", full)
    refused(unlearn_args(proj, proj.parent / "out"), capsys, [proj.parent], "No space left on device")
