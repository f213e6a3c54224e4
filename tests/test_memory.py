"""One memory budget for what unlearn keeps between passes (memory.py), with a fake meter and injected
out-of-memory errors: what is kept, what is refused, the fallback, and that products never change."""

import dataclasses
import functools
import json
import logging

import pytest
import torch

from llmeraser.api import unlearn
from llmeraser.curvature import Curvature, HessianOperator
from llmeraser.memory import MemoryBudget, is_out_of_memory
from llmeraser.modeling import theta_of
from llmeraser.objective import CausalLMObjective
from llmeraser.recipes import recipe
from llmeraser.render import encode

from helpers import DEVICE, write_jsonl

C = 1000.0  # MiB one linearisation takes on the fake meter


def operator(tiny64, budget: MemoryBudget, cache_batches: int = 3):
    """A GGN operator over 10 records in batches of 4 (3 fixed batches) whose builds the fake meter sees."""
    model, tok, records = tiny64
    params, theta = theta_of(model)
    obj = CausalLMObjective(model, tok.pad_token_id)
    items = [encode(r, tok, "chat", 64) for r in records[:10]]
    curv = Curvature(obj, params, theta, "ggn")
    built = []
    real = curv.linearise

    def counted(batch, keep=True, head="loss"):
        built.append(keep)
        return real(batch, keep, head)

    curv.linearise = counted
    op = HessianOperator(curv, items, batch_size=4, damping=0.1, curvature_samples=0, cache_batches=cache_batches,
                         memory=budget, device=DEVICE)
    fresh = HessianOperator(Curvature(obj, params, theta, "ggn"), items, batch_size=4, damping=0.1, curvature_samples=0,
                            device=DEVICE)
    return op, fresh, built, theta


def no_usage(device):
    return 0.0, 0.0


def close(a, b):
    return torch.linalg.vector_norm(a - b) <= 1e-10 * torch.linalg.vector_norm(b)


def test_kept_linearisations_stop_at_the_budget(tiny64):
    """Budget 2.5C, memory plenty: the first build is kept (C), the second expected at C fits (2C), the third would
    make 3C and is refused without being built; the products equal fresh ones."""
    built = []
    budget = MemoryBudget("cpu", 2.5 * C, meter=lambda device: 1e9 - C * len(built), usage=no_usage)
    op, fresh, built_, theta = operator(tiny64, budget)
    built = built_  # the meter reads the operator's count of builds
    v = torch.randn(theta.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    assert close(op.full(v), fresh.full(v))
    assert len(op._linear) == 2 and len(built) == 2
    rec = budget.to_dict()
    assert rec["kept"] == {"linearisation": 2} and rec["refused"] == {"linearisation": 1}
    assert rec["peak_kept_mb"] == 2 * C and rec["budget_mb"] == 2.5 * C and not rec["automatic"]
    op.release()  # a finished solve gives its linearisations back to the budget
    assert budget.kept_mb == 0 and budget.kept["linearisation"]["count"] == 0


@pytest.mark.parametrize("total, kept", [(2.5, 1), (1.5, 0)])
def test_a_linearisation_is_kept_while_a_fresh_products_room_is_left(tiny64, total, kept):
    """Free memory falls by C per build: the first stays when C is left beside it (2.5C free before), is dropped
    with 0.5C left (1.5C), and no second is built (3C needed to start one); the products agree with fresh ones either way."""
    built = []
    budget = MemoryBudget("cpu", 1e9, meter=lambda device: total * C - C * len(built), usage=no_usage)
    op, fresh, built_, theta = operator(tiny64, budget)
    built = built_
    v = torch.randn(theta.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    assert close(op.full(v), fresh.full(v))
    assert len(op._linear) == kept and len(built) == 1
    assert op.cache_batches == kept  # the first refusal stops this operator from trying again


def test_the_first_build_is_checked_against_twice_a_gradients_peak(tiny64):
    """b's gradients measured a peak rise of 100 MiB: the first linearisation is expected at 200 and, with a
    budget of 150, is refused before it is built."""
    peaks = iter([(50.0, 50.0), (50.0, 150.0)])
    budget = MemoryBudget("cpu", 150.0, meter=lambda device: 1e9, usage=lambda device: next(peaks))
    budget.measure("gradient", lambda: None)
    assert budget.estimate("linearisation") == 200.0 and budget.estimate("reset") == 200.0
    op, fresh, built, theta = operator(tiny64, budget)
    v = torch.randn(theta.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    assert close(op.full(v), fresh.full(v))
    assert not built and not op._linear and budget.refused == {"linearisation": 1}


def test_out_of_memory_while_building_falls_back_to_fresh_products(tiny64, caplog):
    budget = MemoryBudget("cpu", 1e9, meter=lambda device: 1e9, usage=no_usage)
    op, fresh, built, theta = operator(tiny64, budget)
    real = op.curvature.linearise

    def full_device(batch, keep=True, head="loss"):
        if keep:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(batch, keep, head)

    op.curvature.linearise = full_device
    v = torch.randn(theta.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    with caplog.at_level(logging.WARNING, logger="llmeraser.memory"):
        assert close(op.full(v), fresh.full(v))
        assert close(op.full(v), fresh.full(v))  # and on the next call: no second attempt
    assert not op._linear and budget.out_of_memory == ["linearisation"]
    assert "out of memory while building a kept linearisation" in caplog.text
    assert op.curvature.mode == "fwd_rev"  # the fresh products kept the forward-mode path


def test_out_of_memory_is_not_read_as_a_missing_forward_mode_rule(tiny64):
    model, tok, records = tiny64
    params, theta = theta_of(model)
    obj = CausalLMObjective(model, tok.pad_token_id)
    batch = obj.collate([encode(r, tok, "chat", 64) for r in records[:4]], DEVICE)
    curv = Curvature(obj, params, theta, "ggn", "auto")

    def full_device(v, batch):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    curv._ggn_fwd = full_device
    with pytest.raises(torch.OutOfMemoryError):
        curv(torch.ones_like(theta), batch)
    assert curv.mode == "auto"  # undecided: not switched for good to the hungrier double-vjp path
    curv._ggn_fwd = lambda v, batch: (_ for _ in ()).throw(NotImplementedError("no jvp rule for aten::foo"))
    curv(torch.ones_like(theta), batch)
    assert curv.mode == "rev_rev"  # a real missing rule still falls back


def test_what_counts_as_out_of_memory():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"))
    assert is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"))
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_out_of_memory(NotImplementedError("out of memory"))


def test_unlearn_json_records_the_budget_and_an_out_of_memory_fallback(tiny_dir, tmp_path, monkeypatch):
    """Through unlearn: an injected out-of-memory in every kept build gives the same Δ as a run that keeps them,
    and unlearn.json says what happened. The host's free memory is not the subject: the budget's meter sees
    1 TiB free, so that a loaded machine cannot refuse the builds this test expects kept."""
    monkeypatch.setattr("llmeraser.problem.MemoryBudget", functools.partial(MemoryBudget, meter=lambda device: 2.0**20))
    req = write_jsonl(tmp_path / "req.jsonl", [{"op": "remove", "id": "r1"},
                                               {"op": "correct_response", "id": "r4", "new": {"response": "1234"}}])
    s = dataclasses.replace(recipe("memorised"), device=DEVICE, dtype="float32", verify="off", memory_mb=4096.0)
    args = (str(tiny_dir / "base"), tiny_dir / "adapter", tiny_dir / "train.jsonl", req)
    normal = unlearn(*args, tmp_path / "normal", settings=s, progress=False, allow_unconverged=True)
    rec = json.loads((tmp_path / "normal" / "unlearn.json").read_text())["memory"]
    assert rec["budget_mb"] == 4096.0 and not rec["automatic"] and rec["kept"].get("linearisation", 0) >= 1
    assert rec["out_of_memory_fallbacks"] == []

    real = Curvature.linearise

    def full_device(self, batch, keep=True, head="loss"):
        if keep:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(self, batch, keep, head)

    monkeypatch.setattr(Curvature, "linearise", full_device)
    short = unlearn(*args, tmp_path / "short", settings=s, progress=False, allow_unconverged=True)
    meta = json.loads((tmp_path / "short" / "unlearn.json").read_text())
    # the first build ran out of memory; the reset's, expected at least as large, were refused unbuilt
    assert meta["memory"]["out_of_memory_fallbacks"] == ["linearisation"] and meta["memory"]["refused"].get("reset")
    assert not meta["memory"]["kept"].get("linearisation") and not meta["memory"]["kept"].get("reset")
    assert rec["kept"].get("reset")  # where the run without the error kept them
    assert meta["solver"]["hvp_mode"] == "fwd_rev"  # fresh products by forward mode, not the hungrier double vjp
    rel = torch.linalg.vector_norm(short.delta - normal.delta) / torch.linalg.vector_norm(normal.delta)
    assert rel < 1e-4, float(rel)  # float32: kept and fresh products differ by rounding only


def test_memory_setting_is_validated():
    from llmeraser.errors import InputError
    from llmeraser.settings import UnlearnSettings

    with pytest.raises(InputError, match="memory_mb"):
        UnlearnSettings(memory_mb=-1)
    assert UnlearnSettings().memory_mb == 0.0  # automatic
