"""A half-precision base (--dtype bfloat16 / float16): Θ and the maths stay float32, and the products and the
whole update stay close to full precision (docs/design.md#dtype)."""

import dataclasses
import json

import pytest
import torch

from llmeraser.api import unlearn
from llmeraser.cli import main
from llmeraser.curvature import Curvature
from llmeraser.data import load_records
from llmeraser.errors import InputError
from llmeraser.modeling import load_adapter, resolve_dtype, theta_of, unload_adapter
from llmeraser.objective import CausalLMObjective
from llmeraser.recipes import recipe
from llmeraser.render import encode

from helpers import DEVICE, load_tiny, write_jsonl

# measured on the tiny Llama (relative error of C v against float64): bfloat16 3e-3 (GGN) and 9e-3 (Hessian);
# float16 4e-4 and 8e-4. bfloat16 keeps 8 significant bits (eps 7.8e-3), float16 11 (eps 9.8e-4).
TOLERANCE = {torch.bfloat16: {"ggn": 1e-2, "ggn-base": 1e-2, "hessian": 2e-2},
             torch.float16: {"ggn": 2e-3, "ggn-base": 2e-3, "hessian": 3e-3}}
REQUEST = [{"op": "remove", "id": "r1"}, {"op": "correct_response", "id": "r4", "new": {"response": "1234"}}]


def products(tiny_dir, dtype, v64):
    model, tok = load_tiny(tiny_dir / "base", dtype, DEVICE)
    peft = load_adapter(model, tiny_dir / "adapter")
    try:
        params, theta = theta_of(peft)
        obj = CausalLMObjective(peft, tok.pad_token_id)
        batch = obj.collate([encode(r, tok, "chat", 64) for r in load_records(tiny_dir / "train.jsonl")[:5]], DEVICE)
        out = {(kind, mode): Curvature(obj, params, theta, kind, mode)(v64.to(theta.device, theta.dtype), batch)
               for kind in ("ggn", "ggn-base", "hessian") for mode in ("fwd_rev", "rev_rev")}
        return theta.dtype, out
    finally:
        unload_adapter(peft)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_products_are_close_to_float64(tiny_dir, dtype):
    model, _ = load_tiny(tiny_dir / "base", torch.float64, DEVICE)
    n = theta_of(load_adapter(model, tiny_dir / "adapter"))[1].numel()
    v = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    _, exact = products(tiny_dir, torch.float64, v)
    theta_dtype, half = products(tiny_dir, dtype, v)
    assert theta_dtype == torch.float32  # Θ and the solver's vectors stay float32 on a half-precision base
    for (kind, mode), got in half.items():
        assert got.dtype == torch.float32
        ref = exact[kind, mode]
        err = float(torch.linalg.vector_norm(got.double() - ref.double()) / torch.linalg.vector_norm(ref))
        assert err < TOLERANCE[dtype][kind], (kind, mode, err)
        assert err > 1e-6  # the base really ran in half precision (float32 agrees to ~3e-7)


def test_half_precision_unlearn_delta_is_close_to_float32(tiny_dir, tmp_path):
    """The whole update (b, the solve, the line search) on a bfloat16 and a float16 base against float32."""
    req = write_jsonl(tmp_path / "req.jsonl", REQUEST)
    deltas = {}
    for name in ("float32", "bfloat16", "float16"):
        s = dataclasses.replace(recipe("default"), dtype=name, device=DEVICE, verify="off")
        res = unlearn(str(tiny_dir / "base"), tiny_dir / "adapter", tiny_dir / "train.jsonl", req, None, settings=s,
                      progress=False, allow_unconverged=True)
        deltas[name] = res.delta.double()
        assert res.delta.dtype == torch.float32
    for name in ("bfloat16", "float16"):
        cos = float(torch.nn.functional.cosine_similarity(deltas[name], deltas["float32"], 0))
        assert cos > 0.99, (name, cos)
    assert not torch.equal(deltas["bfloat16"], deltas["float32"])


def test_dtype_flag_is_recorded_and_auto_is_float32_on_cpu(tiny_dir, tmp_path):
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(InputError, match="--dtype"):
        resolve_dtype("int8", torch.device("cpu"))
    req = write_jsonl(tmp_path / "req.jsonl", REQUEST)
    rc = main(["unlearn", "--base", str(tiny_dir / "base"), "--adapter", str(tiny_dir / "adapter"), "--data",
               str(tiny_dir / "train.jsonl"), "--request", str(req), "--out", str(tmp_path / "out"), "--device", "cpu",
               "--dtype", "bfloat16", "--verify", "off", "--quiet", "--allow-unconverged"])
    assert rc == 0
    meta = json.loads((tmp_path / "out" / "unlearn.json").read_text())
    assert meta["settings"]["dtype"] == "bfloat16"
    from safetensors.torch import load_file
    assert all(t.dtype == torch.float32 for t in load_file(tmp_path / "out" / "adapter_model.safetensors").values())


@pytest.fixture(scope="module")
def head_adapter(tiny_dir, tmp_path_factory):
    """The tiny adapter plus a trained copy of lm_head (modules_to_save), trained a little on a float32 base."""
    from llmeraser.train import TrainSettings, add_lora, train_lora

    root = tmp_path_factory.mktemp("head")
    model, tok = load_tiny(tiny_dir / "base")
    peft = add_lora(model, TrainSettings(rank=2, alpha=4, modules_to_save=("lm_head",), epochs=2, batch_size=4, lr=1e-2))
    train_lora(peft, tok, load_records(tiny_dir / "train.jsonl"), TrainSettings(epochs=2, batch_size=4, lr=1e-2), progress=False)
    peft.save_pretrained(root / "adapter")
    unload_adapter(peft)
    return root / "adapter"


def test_a_trained_head_runs_in_float32_on_a_half_precision_base(tiny_dir, head_adapter, tmp_path):
    """modules_to_save on a bfloat16 base: PEFT copies the head in bfloat16; Θ's copy must be float32, loaded exactly
    as saved, trained in float32, and unlearn's Δ close to the float32 base's (it used to fail: float32 Θ, bfloat16
    activations)."""
    from safetensors.torch import load_file

    from llmeraser.train import TrainSettings, add_lora

    model, _ = load_tiny(tiny_dir / "base", torch.bfloat16)
    fresh = add_lora(model, TrainSettings(rank=2, alpha=4, modules_to_save=("lm_head",)))
    assert {p.dtype for p in fresh.parameters() if p.requires_grad} == {torch.float32}
    unload_adapter(fresh)
    assert model.lm_head.weight.dtype == torch.bfloat16  # the frozen base is untouched
    loaded = load_adapter(model, head_adapter)
    saved = load_file(str(head_adapter / "adapter_model.safetensors"))
    head = next(t for k, t in saved.items() if "lm_head" in k)
    live = dict(loaded.named_parameters())
    copy = next(p for n, p in live.items() if "lm_head.modules_to_save" in n)
    assert copy.dtype == torch.float32 and torch.equal(copy.detach(), head)  # as saved, not rounded to bfloat16
    unload_adapter(loaded)
    req = write_jsonl(tmp_path / "req.jsonl", REQUEST)
    deltas = {}
    for name in ("float32", "bfloat16"):
        s = dataclasses.replace(recipe("default"), dtype=name, device=DEVICE, verify="off")
        res = unlearn(str(tiny_dir / "base"), head_adapter, tiny_dir / "train.jsonl", req, None, settings=s,
                      progress=False, allow_unconverged=True, allow_other_data=True)
        deltas[name] = res.delta.double()
    cos = float(torch.nn.functional.cosine_similarity(deltas["bfloat16"], deltas["float32"], 0))
    assert cos > 0.99, cos


@pytest.mark.parametrize("slowdown, warned", [(60.0, True), (1.5, False)])
def test_bfloat16_on_a_cpu_without_its_kernels_is_warned_about(monkeypatch, caplog, slowdown, warned):
    """A CPU without native bfloat16 kernels runs its products tens of times slower than float32's
    (BENCHMARKS.md#forgetting-float32): --dtype bfloat16 there says so and names float32; float32 never probes."""
    import llmeraser.modeling as modeling
    probes = []
    monkeypatch.setattr(modeling, "cpu_bfloat16_slowdown", lambda: probes.append(1) or slowdown)
    with caplog.at_level("WARNING", logger="llmeraser.modeling"):
        assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    assert ("--dtype float32" in caplog.text) is warned
    assert len(probes) == 1
    caplog.clear()
    with caplog.at_level("WARNING", logger="llmeraser.modeling"):
        assert resolve_dtype("float32", torch.device("cpu")) == torch.float32
        assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert caplog.text == "" and len(probes) == 1


def test_the_bfloat16_probe_measures_a_product_ratio(monkeypatch):
    """The probe times the two dtypes' products: with every bfloat16 product made 250 ms slower (Tensor.__matmul__
    wrapped), it reads a ratio far above SLOW_BF16 (20 ms was not enough on 2 cores shared with a benchmark: the
    float32 product's fastest of three then took over 5 ms). The cache is bypassed: another test may have asked."""
    import time

    import llmeraser.modeling as modeling
    real = torch.Tensor.__matmul__

    def slow_bf16(a, b):
        if a.dtype == torch.bfloat16:
            time.sleep(0.25)
        return real(a, b)

    monkeypatch.setattr(torch.Tensor, "__matmul__", slow_bf16)
    assert modeling.cpu_bfloat16_slowdown.__wrapped__(size=32) > modeling.SLOW_BF16
