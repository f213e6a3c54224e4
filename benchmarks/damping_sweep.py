"""Which curvature and damping bring `unlearn` closest to retraining, on SmolLM2-135M.

Synthetic private records (llmeraser.synthetic), LoRA on q/v, remove every record of one
customer; compare forget / retain NLL of each setting with the retrained adapter. Writes
benchmarks/results/damping_sweep.json. Usage: python -m benchmarks.damping_sweep [--quick]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from llmeraser.data import apply_request, load_records, load_request
from llmeraser.modeling import load_adapter, load_base
from llmeraser.objective import CausalLMObjective
from llmeraser.render import encode, resolve_template
from llmeraser.solvers import SolverSettings
from llmeraser.synthetic import make_customers, make_records
from llmeraser.train import TrainSettings, add_lora, train_lora
from llmeraser.settings import UnlearnSettings
from llmeraser.unlearner import Unlearner

OUT = Path(__file__).parent / "results"
WORK = Path(__file__).parent / "work" / "damping_sweep"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def nll(model, tok, records):
    obj = CausalLMObjective(model, tok.pad_token_id)
    tpl = resolve_template(tok, "auto")
    batch = obj.collate([encode(r, tok, tpl, 128) for r in records], "cpu")
    with torch.no_grad():
        return float(obj.losses(obj.outputs({}, batch), batch).mean())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reuse", action="store_true", help="keep the trained adapters and earlier rows; run only --grid")
    ap.add_argument("--grid", nargs="*", default=None, help="settings as curvature:damping, e.g. ggn:0.03")
    args = ap.parse_args()
    torch.manual_seed(0)
    WORK.mkdir(parents=True, exist_ok=True)
    n_customers = 6 if args.quick else 12
    customers = make_customers(n_customers, seed=0)
    data = write_jsonl(WORK / "train.jsonl", make_records(customers, ("phone", "city", "likes")))
    req = write_jsonl(WORK / "request.jsonl", [{"op": "remove", "id": f"c0-{f}"} for f in ("phone", "city", "likes")])
    records = load_records(data)
    request = load_request(req, records)
    kept = apply_request(records, request)
    forget = [e.old for e in request.edits]
    recipe = TrainSettings(rank=8, alpha=16, epochs=2 if args.quick else 10, lr=3e-3, batch_size=8, weight_decay=0.0)

    def train(recs):
        base, tok = load_base("smollm2")
        model = add_lora(base, recipe)
        t = time.perf_counter()
        train_lora(model, tok, recs, recipe)
        return model, tok, time.perf_counter() - t

    result_file = OUT / ("damping_sweep_quick.json" if args.quick else "damping_sweep.json")
    if args.reuse and result_file.is_file() and (WORK / "adapter").is_dir():
        results = json.loads(result_file.read_text())
        return sweep(args, results, records, request, forget, kept, result_file)
    original, tok, t_train = train(records)
    original.save_pretrained(WORK / "adapter")
    results = {"n": len(records), "forget": len(forget), "recipe": recipe.to_dict(),
               "original": {"forget_nll": nll(original, tok, forget), "retain_nll": nll(original, tok, kept), "seconds": t_train}}
    del original
    retrained, tok, t_re = train(kept)
    results["retrain"] = {"forget_nll": nll(retrained, tok, forget), "retain_nll": nll(retrained, tok, kept), "seconds": t_re}
    del retrained
    print(json.dumps(results, indent=1), flush=True)
    results["settings"] = []
    sweep(args, results, records, request, forget, kept, result_file)


def sweep(args, results, records, request, forget, kept, result_file):
    grid = [("ggn", 1e-3), ("ggn", 1e-2), ("ggn", 1e-1), ("hessian", 1e-2)]
    if args.grid:
        grid = [(g.split(":")[0], float(g.split(":")[1])) for g in args.grid]
    if args.quick:
        grid = grid[:1]
    base, tok = load_base("smollm2")
    model = load_adapter(base, WORK / "adapter")
    for curvature, damping in grid:
        s = UnlearnSettings(curvature=curvature, damping=damping, solver="cg", curvature_samples=16, batch_size=8,
                            device="cpu", solver_settings=SolverSettings(tol=0.02, max_iters=3 if args.quick else 15))
        unl = Unlearner(model, tok, records, s)
        t = time.perf_counter()
        delta, res, stage = unl.delta(request)
        secs = time.perf_counter() - t
        theta = unl.params.unflatten(unl.theta_hat + delta)
        named = dict(model.named_parameters())
        saved = {n: named[n].detach().clone() for n in unl.params.names}
        with torch.no_grad():
            for n, v in theta.items():
                named[n].copy_(v)
        row = {"curvature": curvature, "damping": damping, "forget_nll": nll(model, tok, forget),
               "retain_nll": nll(model, tok, kept), "iterations": res.iterations,
               "final_residual": res.final_residual, "converged": res.converged, "info": {k: v for k, v in res.info.items() if k != "lambda_max_estimate"},
               "seconds": secs, "seconds_b": stage["b"]}
        with torch.no_grad():
            for n, v in saved.items():
                named[n].copy_(v)
        results["settings"].append(row)
        print(json.dumps(row), flush=True)
        OUT.mkdir(exist_ok=True)
        result_file.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
