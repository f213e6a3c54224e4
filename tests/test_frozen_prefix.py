"""Batches evaluated many times start above the layers the adapter leaves frozen (`CausalLMObjective.prepare`).

Every check compares against the whole model in float64: the shortcut must change the cost only."""

import pytest
import torch
from helpers import load_tiny, make_adapter, make_base, toy_records, write_jsonl

from llmeraser import objective as objective_module
from llmeraser.curvature import Curvature, HessianOperator
from llmeraser.data import load_records, load_request
from llmeraser.modeling import load_adapter, unload_adapter
from llmeraser.objective import CausalLMObjective
from llmeraser.render import encode
from llmeraser.acceptance import line_objective
from llmeraser.settings import UnlearnSettings
from llmeraser.unlearner import Unlearner


def adapted(tmp_path, layers_to_transform):
    """(PeftModel in float64 with LoRA on `layers_to_transform` of 3 layers, tokenizer, records, root)."""
    from peft import LoraConfig, get_peft_model

    make_base(tmp_path / "base", layers=3)
    base, tok = load_tiny(tmp_path / "base", torch.float64)
    cfg = LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"],
                     layers_to_transform=list(layers_to_transform), task_type="CAUSAL_LM")
    torch.manual_seed(0)
    peft_model = get_peft_model(base, cfg)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.copy_(0.1 * torch.randn_like(p))
    peft_model.save_pretrained(tmp_path / "adapter")
    unload_adapter(peft_model)
    write_jsonl(tmp_path / "train.jsonl", toy_records(12))
    return load_adapter(base, tmp_path / "adapter"), tok, load_records(tmp_path / "train.jsonl"), tmp_path


@pytest.fixture(scope="module")
def top2(tmp_path_factory):
    return adapted(tmp_path_factory.mktemp("prefix"), (1, 2))


def batch_of(model, tok, records, k=4):
    from llmeraser.render import resolve_template

    template = resolve_template(tok, "auto")
    return [encode(r, tok, template, 64) for r in records[:k]]


def random_theta(unl, scale=0.3):
    torch.manual_seed(1)
    return unl.theta_hat + scale * torch.randn_like(unl.theta_hat)


def test_outputs_above_the_frozen_layers_equal_the_whole_models(top2):
    model, tok, records, _ = top2
    unl = Unlearner(model, tok, records, UnlearnSettings())
    assert unl.problem.objective._prefix == 1  # LoRA on layers 1 and 2 of 0..2: layer 0 is frozen
    layers_before = list(unl.problem.objective._layers)
    plain = CausalLMObjective(model, tok.pad_token_id)
    items = batch_of(model, tok, records)
    prepared = unl.problem.objective.prepare(unl.problem.objective.collate(items, "cpu"))
    assert "prefix" in prepared
    theta = random_theta(unl)  # a Θ away from Θ̂: the stored states must not depend on Θ
    with torch.enable_grad():
        t1 = theta.clone().requires_grad_(True)
        z1 = unl.problem.objective.outputs(unl.params.unflatten(t1), prepared)
        (g1,) = torch.autograd.grad(z1.square().sum(), t1)
        t2 = theta.clone().requires_grad_(True)
        z2 = plain.outputs(unl.params.unflatten(t2), plain.collate(items, "cpu"))
        (g2,) = torch.autograd.grad(z2.square().sum(), t2)
    assert torch.allclose(z1, z2, rtol=0, atol=1e-12)
    assert torch.allclose(g1, g2, rtol=1e-10, atol=1e-12)
    assert all(a is b for a, b in zip(layers_before, unl.problem.objective._layers))  # the frozen layers are put back


@pytest.mark.parametrize("kind", ["ggn", "hessian"])
def test_curvature_products_on_prepared_batches_equal_the_whole_models(top2, kind):
    model, tok, records, _ = top2
    unl = Unlearner(model, tok, records, UnlearnSettings(curvature=kind))
    op = unl.systems.operator(unl.theta_hat, unl.problem.examples, unl.damping)
    assert all("prefix" in b for b in op.fixed)
    plain = CausalLMObjective(model, tok.pad_token_id)
    ref = HessianOperator(Curvature(plain, unl.params, unl.theta_hat, kind), unl.problem.examples, 8, unl.damping,
                          unl.settings.curvature_samples, unl.settings.seed, "cpu", unl.settings.cache_batches)
    assert not any("prefix" in b for b in ref.fixed)
    torch.manual_seed(2)
    v = torch.randn_like(unl.theta_hat)
    assert torch.allclose(op.full(v), ref.full(v), rtol=1e-9, atol=1e-12)


def test_no_shortcut_when_the_adapter_touches_the_first_layer(tmp_path):
    model, tok, records, _ = adapted(tmp_path, (0, 2))
    unl = Unlearner(model, tok, records, UnlearnSettings())
    assert unl.problem.objective._prefix == 0
    assert "prefix" not in unl.problem.objective.prepare(unl.problem.objective.collate(batch_of(model, tok, records), "cpu"))
    assert CausalLMObjective(model, tok.pad_token_id).freeze_prefix(["lm_head.weight"]) == 0  # outside the layers


def test_a_shortcut_that_changes_the_logits_is_switched_off(top2, monkeypatch):
    model, tok, records, _ = top2
    obj = CausalLMObjective(model, tok.pad_token_id)
    unl = Unlearner(model, tok, records, UnlearnSettings())
    assert obj.freeze_prefix(unl.params.names) == 1
    # an architecture where the decoder transforms its input embeddings would look like this
    monkeypatch.setattr(objective_module._PassThrough, "forward", lambda self, h, *a, **k: 2 * h)
    items = batch_of(model, tok, records)
    batch = obj.prepare(obj.collate(items, "cpu"))
    assert "prefix" not in batch and obj._prefix == 0
    plain = CausalLMObjective(model, tok.pad_token_id)
    assert torch.equal(obj.outputs({}, batch), plain.outputs({}, plain.collate(items, "cpu")))


def test_unlearn_with_the_shortcut_equals_unlearn_without(top2, monkeypatch):
    model, tok, records, root = top2
    write_jsonl(root / "request.jsonl", [{"op": "remove", "id": "r3"}, {"op": "correct_response", "id": "r5", "new": {"response": "0000"}}])
    req = load_request(root / "request.jsonl", records)
    settings = UnlearnSettings(curvature_samples=4, damping_grid=(0.01,), seed=3)
    fast = Unlearner(model, tok, records, settings)
    f, exact = line_objective(fast.problem, req, settings.curvature_samples, settings.seed)
    assert not exact and f.start == f(fast.theta_hat)  # the shortcut at Θ̂ is the same number, not an estimate of it
    delta_fast, _, stage_fast = fast.delta(req, progress=False)
    monkeypatch.setattr(CausalLMObjective, "freeze_prefix", lambda self, names: 0)
    slow = Unlearner(model, tok, records, settings)
    assert slow.problem.objective._prefix == 0
    delta_slow, _, stage_slow = slow.delta(req, progress=False)
    assert torch.allclose(delta_fast, delta_slow, rtol=1e-8, atol=1e-12)
    rows = zip(stage_fast["steps"][0]["damping_selection"], stage_slow["steps"][0]["damping_selection"])
    assert all(abs(a["objective"] - b["objective"]) < 1e-10 and a["chosen"] == b["chosen"] for a, b in rows)


@pytest.mark.parametrize("cache", [0, 1])
def test_unlearn_records_how_many_linearisations_it_kept(top2, cache):
    model, tok, records, root = top2
    write_jsonl(root / "request1.jsonl", [{"op": "remove", "id": "r3"}])
    req = load_request(root / "request1.jsonl", records)
    _, result, _ = Unlearner(model, tok, records, UnlearnSettings(cache_batches=cache)).delta(req, progress=False)
    assert result.info["kept_linearisations"] == cache


def test_backtrack_takes_the_known_value_only_at_the_point_it_belongs_to():
    from llmeraser.acceptance import Objective as _Objective, backtrack

    calls = []
    theta = torch.zeros(2, dtype=torch.float64)
    f = _Objective(lambda t: calls.append(t) or float((t - 1).square().sum()), at=theta)
    f.start = 2.0  # f(0)
    assert backtrack(f, theta, torch.ones(2, dtype=torch.float64), -4.0)["accepted"] and len(calls) == 1
    calls.clear()
    backtrack(f, theta.clone(), torch.ones(2, dtype=torch.float64), -4.0)  # another Θ: its value is computed
    assert len(calls) == 2
