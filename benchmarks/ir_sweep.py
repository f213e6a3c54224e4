"""Which `unlearn` settings bring IR at n = 2048 closest to retraining, on the suite's cached adapters.

The paper suite's scaling run (`python -m benchmarks.run --suite paper --scenarios scaling --scaling-n 2048`)
leaves the n = 2048 original and retrained adapters in benchmarks/work/paper/scaling/n2048. Training them
costs two CPU-hours; this script reuses them and tries `unlearn` settings against them. It loads the model
once and computes b once (b does not depend on the settings); each setting then costs one solve, a line
search and an evaluation of the removed samples and a sample of retained ones that is disjoint from the
curvature sample, so no scored record is one the curvature was taken on. Writes benchmarks/results/ir_sweep.json, one row per setting, appended.

Usage: python -m benchmarks.ir_sweep [--n 2048] [--epochs E] [--grid damping=0.01,curvature_samples=64 damping_grid=0.003:0.01 ...] [--test]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from llmeraser.curvature import seeded_subset
from llmeraser.data import load_records, load_request
from llmeraser.evaluate import AdapterEval
from llmeraser.fileio import write_json
from llmeraser.modeling import load_adapter, load_base, read_adapter_file, adapter_weights_path
from llmeraser.unlearner import Unlearner

from .paper import FULL, llmeraser_settings

OUT = Path(__file__).parent / "results" / "ir_sweep.json"
WORK = Path(__file__).parent / "work" / "paper" / "scaling"


def parse_setting(spec: str) -> dict:
    """'damping=0.01,curvature_samples=64,max_iters=16' -> {'damping': 0.01, ...};
    'damping_grid=0.003:0.01' -> {'damping_grid': (0.003, 0.01)}."""
    out = {}
    for part in filter(None, spec.split(",")):
        k, v = part.split("=")
        if k == "damping_grid":
            out[k] = tuple(float(x) for x in v.split(":"))
        else:
            out[k] = v if k == "curvature" else (int(v) if k in ("curvature_samples", "line_search_samples", "max_iters", "newton_steps", "refine_iters") else float(v))
    return out


def settings_for(base, spec: dict):
    solver_kw = {k: spec[k] for k in ("max_iters", "tol") if k in spec}
    kw = {k: v for k, v in spec.items() if k not in solver_kw}
    return replace(base, solver_settings=replace(base.solver_settings, **solver_kw), **kw)


class Scorer:
    """Forget / retain (/ test) metrics of whatever Θ is loaded in the model."""

    def __init__(self, model, tok, template, forget, retain, test):
        self.ev = AdapterEval(model, tok, template, max_length=FULL.max_length)
        self.splits = {"forget": forget, "retain": retain, **({"test": test} if test else {})}

    def __call__(self) -> dict:
        out = {}
        for name, recs in self.splits.items():
            nll = self.ev.nll(recs)
            out[name] = {"nll": sum(nll) / len(nll), **self.ev.yes_no(recs, nll)}
        return out


def load_theta(model, params, theta: torch.Tensor) -> None:
    named = dict(model.named_parameters())
    with torch.no_grad():
        for n, v in params.unflatten(theta).items():
            named[n].copy_(v)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2048, help="the scaling point whose cached adapters to use")
    ap.add_argument("--grid", nargs="*", default=["damping=0.03"],
                    help="settings to try, each as key=value pairs joined by commas; keys are UnlearnSettings fields "
                         "and the solver's max_iters and tol; damping_grid takes λ values joined by ':' (every other setting "
                         "is the suite's, with one λ: the default damping=0.03 is the suite's CG without its grid, "
                         "damping_grid=0.003:0.01 is the suite's CG)")
    ap.add_argument("--epochs", type=float, default=None,
                    help="the recipe's epoch count when the point was trained with `benchmarks.run --epochs E` (its own folders)")
    ap.add_argument("--retain", type=int, default=48, help="retained samples to score, none from the curvature sample")
    ap.add_argument("--test", action="store_true", help="score the point's test set too (slower)")
    ap.add_argument("--table", action="store_true", help="print the recorded rows of this point as a markdown table and stop")
    args = ap.parse_args()
    tag = f"epochs{args.epochs:g}" if args.epochs is not None and args.epochs != FULL.epochs else ""
    d = WORK.parent / tag / "scaling" / f"n{args.n}"
    key = f"n{args.n}" + (f"-{tag}" if tag else "")
    if args.table:
        recorded = json.loads(OUT.read_text()) if OUT.is_file() else {}
        if key not in recorded:
            raise SystemExit(f"{OUT} has no rows for {key}; run this script without --table first")
        return print(table(recorded[key]))
    if not (d / "original").is_dir() or not (d / "retrain").is_dir():
        raise SystemExit(f"{d} has no trained original and retrain; run "
                         f"`python -m benchmarks.run --suite paper --scenarios scaling --scaling-n {args.n}"
                         + (f" --epochs {args.epochs:g}" if tag else "") + "` first")
    records = load_records(d / "train.jsonl")
    request = load_request(d / "request.jsonl", records)
    test = load_records(d / "test.jsonl") if args.test else None
    removed = {e.index for e in request.edits}
    kept = [r for i, r in enumerate(records) if i not in removed]
    # one λ unless a setting names a grid, so every row is what its spec says (the suite's own CG adds
    # damping_grid=0.003:0.01)
    base_settings = replace(llmeraser_settings(FULL, "cg"), damping_grid=())
    # the curvature sample is seeded_subset(kept, curvature_samples, seed); score retained samples outside the largest one tried
    largest = max([base_settings.curvature_samples] + [parse_setting(g).get("curvature_samples", 0) for g in args.grid])
    curv_ids = {r.id for r in seeded_subset(kept, largest, base_settings.seed)}
    retain = [r for r in seeded_subset(kept, 0, 1) if r.id not in curv_ids][:args.retain]
    forget = [records[i] for i in sorted(removed)]

    base, tok = load_base("smollm2")
    model = load_adapter(base, d / "original")
    unl = Unlearner(model, tok, records, base_settings)
    params, theta_hat = unl.params, unl.theta_hat.clone()
    score = Scorer(model, tok, unl.problem.template, forget, retain, test)
    results = json.loads(OUT.read_text()) if OUT.is_file() else {}
    point = results.setdefault(key, {"n": args.n, "edits": len(forget), "retain": len(retain), "rows": []})
    for ref in ("original", "retrain"):
        ref_key = ref + ("+test" if test else "")
        if ref_key not in point:
            flat = theta_hat if ref == "original" else flat_from_file(model, params, theta_hat, d / ref)
            load_theta(model, params, flat)
            point[ref_key] = score()
            print(ref, json.dumps(point[ref_key]), flush=True)
    load_theta(model, params, theta_hat)
    t = time.perf_counter()
    unl.problem.old_grad(request)
    seconds_b = time.perf_counter() - t
    for spec_text in args.grid:
        spec = parse_setting(spec_text)
        s = settings_for(base_settings, spec)
        u = Unlearner(model, tok, records, s)
        u.problem.old_grads = unl.problem.old_grads  # b is the same for every setting
        t = time.perf_counter()
        delta, res, stage = u.delta(request)
        secs = time.perf_counter() - t
        load_theta(model, params, theta_hat + delta)
        row = {"setting": spec, "metrics": score(), "seconds_solve": secs, "seconds_b": seconds_b,
               "steps": stage["steps"], "delta_norm": float(delta.norm()), "with_test": bool(test),
               "date": time.strftime("%Y-%m-%d")}
        for st in row["steps"]:
            if st.get("line_search"):
                st["line_search"].pop("trace", None)
        load_theta(model, params, theta_hat)
        point["rows"].append(row)
        print(json.dumps(row), flush=True)
        write_json(OUT, results)
    write_json(OUT, results)
    print(table(point))


def table(point: dict) -> str:
    """The point's rows as a markdown table, with the original and retrain first."""
    def cells(m):
        out = [f"{m['forget']['auc']:.3f}", f"{m['forget']['nll']:.3f}", f"{m['retain']['auc']:.3f}", f"{m['retain']['nll']:.3f}"]
        return out + [f"{m['test']['auc']:.3f}" if "test" in m else "–"]
    head = ["adapter", "forget AUC", "forget NLL", "retain AUC", "retain NLL", "test AUC", "CG iterations", "residual",
            "step scale", "solve s"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for ref in ("original", "retrain"):
        m = point.get(ref + "+test") or point[ref]
        lines.append("| " + " | ".join([ref] + cells(m) + ["–"] * 4) + " |")
    for r in point["rows"]:
        st = r["steps"][-1]
        name = "llmeraser " + ", ".join(f"{k} {_fmt(v)}" for k, v in r["setting"].items())
        chosen = [c for c in st.get("damping_selection") or () if c["chosen"]]
        if chosen:
            name += f" (chose λ = {chosen[0]['damping']:g})"
        scale = (st.get("line_search") or {}).get("scale", 1.0)
        lines.append("| " + " | ".join([name] + cells(r["metrics"]) + [str(st["iterations"]), f"{st['final_residual']:.3f}",
                                                                       f"{scale:g}", f"{r['seconds_solve']:.0f}"]) + " |")
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, (tuple, list)):  # a grid: a tuple when just parsed, a list when read back from the JSON
        return "/".join(f"{x:g}" for x in v)
    return v if isinstance(v, str) else f"{v:g}"


def flat_from_file(model, params, current: torch.Tensor, adapter_dir: Path) -> torch.Tensor:
    """Θ of a saved adapter in the layout of `params` (PEFT's file keys lack the adapter name); the model
    is left holding `current`."""
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(model, read_adapter_file(adapter_weights_path(adapter_dir)))
    named = dict(model.named_parameters())
    flat = params.flatten({n: named[n].detach() for n in params.names}).clone()
    load_theta(model, params, current)
    return flat


if __name__ == "__main__":
    main()
