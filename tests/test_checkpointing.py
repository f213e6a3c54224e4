"""Activation checkpointing (modeling.checkpointed): products and gradients are bit-identical with and without it
(float64), a whole update and a training run equal to float32 rounding, in eval mode, and it really holds fewer
activations."""

import dataclasses

import pytest
import torch

from llmeraser.api import unlearn
from llmeraser.baselines import train
from llmeraser.curvature import Curvature
from llmeraser.modeling import checkpointed, decoder_layers, theta_of
from llmeraser.objective import CausalLMObjective
from llmeraser.recipes import recipe
from llmeraser.render import encode
from llmeraser.train import TrainSettings

from helpers import DEVICE, write_jsonl


def setup(tiny64):
    """Θ away from the adapter's own tensors: every pass runs under functional_call, whose tensors the
    checkpointed recomputation (in the backward, after functional_call returned) must see again."""
    model, tok, records = tiny64
    params, theta = theta_of(model)
    theta = theta + 0.1 * torch.randn(theta.numel(), dtype=theta.dtype, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    obj = CausalLMObjective(model, tok.pad_token_id)
    batch = obj.collate([encode(r, tok, "chat", 64) for r in records[:5]], DEVICE)
    v = torch.randn(theta.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    return obj, params, theta, batch, v


@pytest.mark.parametrize("kind, mode", [("ggn", "fwd_rev"), ("ggn", "rev_rev"), ("ggn-base", "fwd_rev"),
                                        ("hessian", "rev_rev")])
def test_products_are_bit_identical_with_checkpointing(tiny64, kind, mode):
    obj, params, theta, batch, v = setup(tiny64)
    plain = Curvature(obj, params, theta, kind, mode)(v, batch)
    with checkpointed(obj.model):
        assert not obj.model.training  # eval mode throughout: no dropout in any product
        ckpt = Curvature(obj, params, theta, kind, mode)(v, batch)
    assert torch.equal(plain, ckpt)


def test_kept_linearisation_and_gradient_are_bit_identical_and_hessian_auto_falls_back(tiny64):
    obj, params, theta, batch, v = setup(tiny64)
    curv = Curvature(obj, params, theta, "ggn")
    lin, grad = curv.linearise(batch)(v), curv.loss_gradient(batch)[0]
    hess = Curvature(obj, params, theta, "hessian", "rev_rev")(v, batch)
    with checkpointed(obj.model):
        assert torch.equal(curv.linearise(batch)(v), lin) and torch.equal(curv.loss_gradient(batch)[0], grad)
        auto = Curvature(obj, params, theta, "hessian", "auto")
        assert torch.equal(auto(v, batch), hess) and auto.mode == "rev_rev"  # torch.func refuses saved-tensor hooks
    layers = decoder_layers(obj.model)
    assert len(layers) == 2 and all("forward" not in layer.__dict__ for layer in layers)  # restored


def saved_bytes(obj, params, theta, batch) -> int:
    """Bytes autograd saves for the backward of one gradient (what a checkpointed layer does not keep)."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        th = theta.clone().requires_grad_(True)
        loss = obj.losses(obj.outputs(params.unflatten(th), batch), batch).sum()
    torch.autograd.grad(loss, th)
    return total[0]


def test_checkpointing_holds_fewer_activations(tiny64):
    obj, params, theta, batch, _ = setup(tiny64)
    plain = saved_bytes(obj, params, theta, batch)
    with checkpointed(obj.model):
        ckpt = saved_bytes(obj, params, theta, batch)
    assert ckpt < 0.5 * plain, (ckpt, plain)


def test_unlearn_and_training_are_the_same_with_checkpointing(tiny_dir, trainable_dir, tmp_path):
    req = write_jsonl(tmp_path / "req.jsonl", [{"op": "remove", "id": "r1"},
                                               {"op": "correct_response", "id": "r4", "new": {"response": "1234"}}])
    deltas, verdicts = [], []
    for on in (False, True):
        # nothing kept (memory_mb ~0): which graphs are kept depends on the memory free, and a kept graph rounds
        # differently from a fresh product
        s = dataclasses.replace(recipe("memorised"), device=DEVICE, checkpointing=on, verify="check", verify_retained=4,
                                memory_mb=1e-9)
        res = unlearn(str(tiny_dir / "base"), tiny_dir / "adapter", tiny_dir / "train.jsonl", req, None, settings=s,
                      progress=False, allow_unconverged=True)
        deltas.append(res.delta)
        verdicts.append(res.report.verification["records"])
    # float32 end to end: equal up to the kernels' rounding (bit-identical run alone; 3e-7 measured after other tests,
    # whose allocations move the tensors' alignment and with it the CPU kernels' summation order)
    assert float((deltas[0] - deltas[1]).abs().max() / deltas[0].abs().max()) < 1e-5
    assert verdicts[0] == verdicts[1]
    from safetensors.torch import load_file

    settings = TrainSettings(rank=4, alpha=8, epochs=3, lr=2e-2, batch_size=4, max_length=64)
    outs = [train(str(trainable_dir / "base"), trainable_dir / "train.jsonl", tmp_path / f"t{on}", settings,
                  device=DEVICE, progress=False, checkpointing=on) for on in (False, True)]
    a, b = (load_file(str(o / "adapter_model.safetensors")) for o in outs)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)
    assert any(not torch.equal(a[k], torch.zeros_like(a[k])) for k in a)
