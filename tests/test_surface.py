"""The product surface: named recipes, a short `unlearn --help`, `--config` replaying a run, the in-memory API."""

import json

import pytest
import torch
from safetensors.torch import load_file

from llmeraser.cli import build_parser, main
from llmeraser.errors import InputError
from llmeraser.recipes import RECIPES, recipe, resolve
from llmeraser.report import UnlearnReport
from llmeraser.settings import UnlearnSettings

from helpers import load_tiny, toy_records, write_jsonl

REQUEST = [{"op": "remove", "id": "r1"}, {"op": "correct_response", "id": "r4", "new": {"response": "1234"}}]


def unlearn_parser():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sub.choices["unlearn"]


def test_unlearn_help_has_at_most_20_flags_and_lists_the_recipes(capsys):
    flags = [a for a in unlearn_parser()._actions if a.option_strings and a.dest != "help"]
    assert len(flags) <= 20, [a.option_strings[0] for a in flags]
    with pytest.raises(SystemExit):
        main(["unlearn", "--help"])
    text = capsys.readouterr().out
    assert all(name in text for name in RECIPES) and "--config" in text


def test_every_recipe_is_valid_and_round_trips_through_the_schema():
    for name in RECIPES:
        s = recipe(name)
        assert UnlearnSettings.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    with pytest.raises(InputError, match="unknown"):
        recipe("fast")


def test_resolution_order_recipe_then_config_then_flags():
    name, s = resolve("memorised", {"recipe": "paper", "settings": {"damping": 0.5, "solver_settings": {"tol": 0.2}}},
                      {"damping": 0.7})
    assert name == "memorised" and s.curvature == "ggn-base" and s.damping == 0.7 and s.solver_settings.tol == 0.2
    assert s.solver_settings.max_iters == 10  # the recipe's, kept under the config's tol
    name, s = resolve(None, {"recipe": "paper", "settings": {}}, {})
    assert name == "paper" and s == recipe("paper")
    # the default recipe's grid needs CG: choosing another solver drops it, unless the grid was asked for
    assert resolve(None, None, {"solver": "stochastic"})[1].dampings == (0.03,)
    with pytest.raises(InputError, match="needs solver 'cg'"):
        resolve(None, {"settings": {"damping_grid": [0.01]}}, {"solver": "stochastic"})


def cli(tiny_dir, req, out, *extra):
    return main(["unlearn", "--base", str(tiny_dir / "base"), "--adapter", str(tiny_dir / "adapter"), "--data",
                 str(tiny_dir / "train.jsonl"), "--request", str(req), "--out", str(out), "--device", "cpu", "--quiet",
                 "--allow-unconverged", *extra])


def test_config_replays_a_run_to_the_same_delta(tiny_dir, tmp_path):
    req = write_jsonl(tmp_path / "req.jsonl", REQUEST)
    assert cli(tiny_dir, req, tmp_path / "a", "--recipe", "memorised", "--damping", "0.2", "--max-iters", "4", "--verify",
               "check") == 0
    first = json.loads((tmp_path / "a" / "unlearn.json").read_text())
    assert first["recipe"] == "memorised" and first["settings"]["damping"] == 0.2
    assert first["settings"]["solver_settings"]["max_iters"] == 4 and first["schema_version"] == 1
    assert cli(tiny_dir, req, tmp_path / "b", "--config", str(tmp_path / "a" / "unlearn.json")) == 0
    again = json.loads((tmp_path / "b" / "unlearn.json").read_text())
    assert again["settings"] == first["settings"] and again["recipe"] == "memorised"
    a, b = (load_file(str(tmp_path / x / "adapter_model.safetensors")) for x in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert UnlearnReport.from_dict(first).to_dict() == first


def test_in_memory_api_writes_nothing_and_agrees_with_the_cli(tiny_dir, tmp_path, monkeypatch):
    from peft import LoraConfig, PeftModel, get_peft_model

    import llmeraser

    # a PeftModel built here, saved only so that the CLI can read the same adapter
    base, tok = load_tiny(tiny_dir / "base")
    torch.manual_seed(3)
    peft_model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.copy_(0.1 * torch.randn_like(p))
    peft_model.eval()
    rows = toy_records(12)
    monkeypatch.chdir(tmp_path)
    res = llmeraser.unlearn_model(peft_model, tok, rows, REQUEST, weight_decay=0.0, recipe="default")
    assert list(tmp_path.iterdir()) == []  # nothing written
    assert res.out is None and res.report.recipe == "default" and res.report.n == 12
    saved = tmp_path.parent / f"{tmp_path.name}-inputs"
    peft_model.save_pretrained(saved / "adapter")
    write_jsonl(saved / "train.jsonl", rows)
    req = write_jsonl(saved / "req.jsonl", REQUEST)
    assert main(["unlearn", "--base", str(tiny_dir / "base"), "--adapter", str(saved / "adapter"), "--data",
                 str(saved / "train.jsonl"), "--request", str(req), "--out", str(saved / "out"), "--device", "cpu",
                 "--quiet", "--allow-unconverged"]) == 0
    written = load_file(str(saved / "out" / "adapter_model.safetensors"))
    assert written.keys() == res.state_dict.keys()
    assert all(torch.equal(written[k], res.state_dict[k].to(written[k].dtype)) for k in written)
    # a model loaded without trainable tensors is refused with the fix
    frozen = PeftModel.from_pretrained(load_tiny(tiny_dir / "base")[0], str(saved / "adapter"))
    with pytest.raises(InputError, match="is_trainable=True"):
        llmeraser.unlearn_model(frozen, tok, rows, REQUEST, weight_decay=0.0)
    with pytest.raises(TypeError):
        llmeraser.unlearn_model(peft_model, tok, rows, REQUEST)  # the training L2 has no silent default
