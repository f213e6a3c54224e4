"""One rank of tests/test_distributed.py (2 processes, gloo): runs the golden cases' Unlearner, the same with the
all-reduce switched off, the CLI's `unlearn` and `train`, and data-parallel training, and saves what it saw to
OUT/rank{r}.pt for the test to compare with one process. The test forks the ranks with torchrun's environment;
torchrun itself runs it the same way (OUT must hold request.jsonl):

    torchrun --standalone --nproc_per_node 2 tests/distributed_worker.py TINY_DIR OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

# the cases compared with one process (golden cases, with their batch sizes changed so that every product passes
# over several batches): CG with a λ grid and a line search; ggn-base with the reset term; the control variate;
# the anchor; the stochastic solver (its mini-batch products replicated on every rank)
CASES = {"mixed/default/cg": {"batch_size": 2}, "mixed/memorised/cg": {"batch_size": 4, "newton_steps": 1},
         "extra/control_variate": {"batch_size": 2}, "extra/anchor_kept": {"batch_size": 4, "damping_grid": []},
         "mixed/default/stochastic": {"batch_size": 4}}
# Newton refinement on a sample: its Δ moves by ~1e-8 with the order of summation in one process already
REFINE = ("extra/refine_on_a_sample", {"batch_size": 2})
TRAIN = ({"batch_size": 5, "grad_accum": 2, "weight_decay": 0.01, "lr": 0.01, "epochs": 1.0},  # shares of 3 and 2
         {"batch_size": 1, "weight_decay": 0.01, "lr": 0.01, "epochs": 0.25})  # rank 1's share is empty


def case_settings(name: str, changes: dict) -> dict:
    from golden.cases import cases

    return {**next(s for n, _, s in cases() if n == name), **changes}


def run_unlearner(model, tok, records, name: str, changes: dict, tmp: Path) -> dict:
    from golden.cases import REQUESTS, WEIGHT_DECAY
    from llmeraser.data import load_request
    from llmeraser.settings import UnlearnSettings
    from llmeraser.unlearner import Unlearner

    kind = name.split("/")[0] if not name.startswith("extra/") else "mixed"
    path = tmp / f"{kind}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in REQUESTS[kind]))
    unl = Unlearner(model, tok, records, UnlearnSettings.from_dict(case_settings(name, changes)), weight_decay=WEIGHT_DECAY)
    delta, result, stage = unl.delta(load_request(path, records), progress=False)
    return {"delta": delta, "hvps": result.info["hvps"], "hvps_all": result.info.get("hvps_all_processes"),
            "iterations": result.iterations}


def trained(base_dir: Path, records, settings: dict) -> torch.Tensor:
    """The flat adapter after `train_lora` from a fresh LoRA on the float64 tiny base."""
    from helpers import load_tiny
    from llmeraser.train import TrainSettings, add_lora, train_lora

    model, tok = load_tiny(base_dir, torch.float64)
    peft = add_lora(model, TrainSettings(rank=2, alpha=4.0, seed=1, **settings))
    train_lora(peft, tok, records, TrainSettings(rank=2, alpha=4.0, seed=1, **settings), progress=False)
    return torch.cat([p.detach().reshape(-1) for p in peft.parameters() if p.requires_grad])


def counting(module, name: str, calls: list):
    """Wrap module.name so each call is recorded in `calls`."""
    original = getattr(module, name)

    def wrapped(*a, **kw):
        calls.append(name)
        return original(*a, **kw)

    setattr(module, name, wrapped)


def main(tiny: Path, out: Path) -> None:
    from helpers import load_tiny
    from llmeraser import api, baselines, distributed
    from llmeraser.cli import main as cli
    from llmeraser.data import load_records
    from llmeraser.modeling import load_adapter

    assert distributed.init_from_env() and distributed.size() == 2  # the torchrun path of `llmeraser`'s CLI
    r = distributed.rank()
    tmp = out / f"tmp{r}"
    tmp.mkdir(parents=True)
    base, tok = load_tiny(tiny / "base", torch.float64)
    model = load_adapter(base, tiny / "adapter")
    records = load_records(tiny / "train.jsonl")
    seen = {"rank": r, "cases": {name: run_unlearner(model, tok, records, name, c, tmp) for name, c in (*CASES.items(), REFINE)}}

    # the same case with the all-reduce switched off: each rank solves on its half alone
    real = distributed.all_sum, distributed.all_sum_float
    distributed.all_sum, distributed.all_sum_float = (lambda t: t), (lambda x: x)
    seen["unreduced"] = run_unlearner(model, tok, records, *next(iter(CASES.items())), tmp)["delta"]
    distributed.all_sum, distributed.all_sum_float = real

    # the CLI: every rank computes, rank 0 alone checks the output folder, writes it and reports
    print("--- cli ---", file=sys.stderr, flush=True)
    calls = []
    for module, name in ((api, "check_output_dir"), (api, "atomic_dir"), (baselines, "check_output_dir"),
                         (baselines, "atomic_dir")):
        counting(module, name, calls)
    seen["cli_unlearn"] = cli(["unlearn", "--base", str(tiny / "base"), "--adapter", str(tiny / "adapter"),
                               "--data", str(tiny / "train.jsonl"), "--request", str(tmp.parent / "request.jsonl"),
                               "--out", str(out / "outputs" / "unlearned"), "--device", "cpu", "--batch-size", "2",
                               "--allow-unconverged", "--quiet"])
    seen["cli_train"] = cli(["train", "--base", str(tiny / "base"), "--data", str(tiny / "train.jsonl"),
                             "--out", str(out / "outputs" / "trained"), "--device", "cpu", "--rank", "2",
                             "--epochs", "0.5", "--batch-size", "4", "--quiet"])
    # an existing --out: rank 0 refuses it and every rank gets the same error, none hangs
    seen["cli_exists"] = cli(["train", "--base", str(tiny / "base"), "--data", str(tiny / "train.jsonl"),
                              "--out", str(out / "outputs" / "trained"), "--device", "cpu", "--quiet"])
    seen["file_calls"] = calls
    print("--- end ---", file=sys.stderr, flush=True)

    seen["train"] = [trained(tiny / "base", records, s) for s in TRAIN]
    torch.save(seen, out / f"rank{r}.pt")
    distributed.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
