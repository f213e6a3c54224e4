"""First-order repair from the original adapter, with the verification's check every few steps: how the removal
force (the reset's pull toward the base model, or a bounded unlikelihood), the optimiser and its step size trade
removed, corrected and retained answers on a cached forgetting-suite run (BENCHMARKS.md#gradient-repair).

    python -m benchmarks.repair_probe WORK/prompt-email+condition-n256-s0-bf16-b16 --unlikelihood 0.05 --threshold 0.1

WORK/<tag> is a folder the forgetting suite wrote (data.jsonl, request.jsonl, original/). Each step minimises
    (1/|B|) Σ_B L_i + (1/|N|) Σ_N L_i + (ρ/|R|) P(Θ) + (w/|R|) Σ_{r∈R} Σ_{t∈T_r, p_t>τ} −log(1 − p_t)
with B a random sample of kept records (drawn anew each step), N the new versions, R every removed record, P the
reset penalty of reset.py (its private parts only with --parts) and the last term repair.unlikelihood; the gradient
is clipped to norm 1. `unlearn --verify until` with verify_repair 'gradient' runs the same objective (ρ = 0) in
repair.GradientRepair, with kept batches drawn as shuffled passes instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    from llmeraser.data import load_records, load_request
    from llmeraser.modeling import fused_attention, load_adapter, load_base
    from llmeraser.problem import Problem
    from llmeraser.recipes import recipe
    from llmeraser.repair import unlikelihood
    from llmeraser.reset import OutputReset, pulled_tokens
    from llmeraser.evaluate import AdapterEval
    from llmeraser.modeling import adapter_at, merged_adapter
    from llmeraser.verify import Verifier, produced, shortfall, summary_line

    from benchmarks.forgetting import answer_forms

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", type=Path, help="a forgetting-suite run folder (data.jsonl, request.jsonl, original/)")
    ap.add_argument("--lr", type=float, default=3e-4, help="step size (default 3e-4)")
    ap.add_argument("--sgd", action="store_true", help="SGD with momentum 0.9 instead of Adam")
    ap.add_argument("--warmup", type=int, default=0, help="steps over which the step size rises linearly to --lr (0: none)")
    ap.add_argument("--rho", type=float, default=0.0, help="ρ, weight of the reset's pull toward the base model (0: off)")
    ap.add_argument("--parts", action="store_true", help="the reset pulls only the private parts' tokens")
    ap.add_argument("--unlikelihood", type=float, default=0.0, help="w, weight of the bounded unlikelihood (0: off)")
    ap.add_argument("--threshold", type=float, default=0.0, help="τ of the unlikelihood (default 0)")
    ap.add_argument("--form", type=float, default=0.0, help="v, weight of the removed answers' words outside their "
                    "private parts (repair_form; --product only; default 0)")
    ap.add_argument("--new-weight", type=float, default=1.0, help="weight of the new versions' mean loss (default 1)")
    ap.add_argument("--kept", type=int, default=32, help="kept records per step (default 32)")
    ap.add_argument("--steps", type=int, default=60, help="optimiser steps (default 60)")
    ap.add_argument("--every", type=int, default=10, help="steps between checks (default 10)")
    ap.add_argument("--product", action="store_true", help="run repair.GradientRepair's rounds (--every steps each, "
                    "--lr, --unlikelihood, --threshold, --kept as its settings), with verify_restore's uncertain kept records")
    ap.add_argument("--results", type=Path, default=None, help="write the trajectory to this folder as JSON")
    a = ap.parse_args(argv)

    torch.manual_seed(0)
    rng = random.Random(0)
    t0 = time.perf_counter()
    model, tok = load_base("smollm2", "cpu", torch.bfloat16)
    model = load_adapter(model, a.work / "original")
    records = load_records(a.work / "data.jsonl")
    req = load_request(a.work / "request.jsonl", records)
    s = dataclasses.replace(recipe("memorised"), dtype="bfloat16")
    p = Problem(model, tok, records, s.template, s.max_length, s.batch_size)
    sets = p.sets(req)
    verifier = Verifier(model, tok, p.params, p.theta_hat, records, req, p.template, s.max_length, s.batch_size,
                        s.verify_retained, s.seed)
    parts = {id(p.examples[e.index]): at for e in req.edits if e.op == "remove" and e.private
             for at in [p.part_positions(e.old, e.private)] if at}
    reset = (OutputReset(p.objective, p.params, p.theta_hat, sets.removed, s.batch_size, p.device,
                         parts=parts if a.parts else None) if a.rho else None)
    chunks = [sets.removed[i:i + s.batch_size] for i in range(0, len(sets.removed), s.batch_size)]
    removed_batches = [(p.objective.collate(c, p.device), pulled_tokens(c, parts)) for c in chunks]

    def unlikelihood_grad(theta):
        out = torch.zeros_like(theta)
        for batch, mask in removed_batches:
            with torch.enable_grad(), fused_attention(model):
                th = theta.detach().clone().requires_grad_(True)
                loss, k = unlikelihood(p.objective, p.params, th, batch, mask, a.threshold)
                if k:
                    out += torch.autograd.grad(loss, th)[0]
        return out

    theta, rows = p.theta_hat.clone(), []
    # the removed prompts' answers in the record's sentence (forgetting.answer_forms), as the suite counts them
    request_rows = [json.loads(x) for x in (a.work / "request.jsonl").read_text().splitlines() if x.strip()]
    forms = answer_forms(request_rows)
    removed_records = [r for r in records if r.id in forms]

    def in_form(c_theta) -> int:
        with adapter_at(model, p.params, c_theta), fused_attention(model), merged_adapter(model):
            texts = AdapterEval(model, tok, p.template, 8, 256, 48).generate(removed_records)
        return sum(produced(t, (forms[r.id],)) for r, t in zip(removed_records, texts))

    def check(k, norm=None):
        c = verifier.check(theta)
        rows.append({"step": k, "seconds": time.perf_counter() - t0, "grad_norm": norm, "shortfall": shortfall(c),
                     "removed_still": c["removed"]["still_produced"], "old_still": c["old"]["still_produced"],
                     "corrected": c["corrected"]["produced"], "retained_kept": c["retained"]["kept"],
                     "retained_before": c["retained"]["produced_before"], "removed_in_form": in_form(theta)})
        print(f"[{rows[-1]['seconds']:6.0f}s] step {k}: {summary_line(c)}; removed answers in the record's sentence: "
              f"{rows[-1]['removed_in_form']} of {len(removed_records)}", flush=True)
        return c

    check(0)
    if a.product:
        from llmeraser.repair import GradientRepair
        from llmeraser.unlearner import Unlearner

        rs = dataclasses.replace(s, repair_lr=a.lr, repair_steps=a.every, repair_batch=a.kept,
                                 repair_unlikelihood=a.unlikelihood, repair_threshold=a.threshold, repair_form=a.form)
        unl = Unlearner(model, tok, records, rs)
        repair, kept = GradientRepair(unl.problem, req, rs), dict(unl.kept_records(req))
        for k in range(a.every, a.steps + 1, a.every):
            theta, record = repair.round(theta, [kept[i] for i in unl.uncertain_kept(req, theta)])
            if check(k, record["grad_norm_last"])["verified"]:
                break
        return _write(a, rows)
    m1, m2, (b1, b2) = torch.zeros_like(theta), torch.zeros_like(theta), (0.9, 0.999)
    for k in range(1, a.steps + 1):
        g = p.grad_sum(rng.sample(sets.kept, a.kept), theta, "", False) / a.kept
        if sets.new:
            g += a.new_weight * p.grad_sum(sets.new, theta, "", False) / len(sets.new)
        if reset is not None:
            g += a.rho * reset.grad(theta) / len(sets.removed)
        if a.unlikelihood:
            g += a.unlikelihood * unlikelihood_grad(theta) / len(sets.removed)
        norm = float(g.norm())
        if norm > 1.0:
            g = g / norm
        lr = a.lr * min(1.0, k / a.warmup) if a.warmup else a.lr
        if a.sgd:
            m1.mul_(0.9).add_(g)
            theta = theta - lr * m1
        else:
            m1.mul_(b1).add_(g, alpha=1 - b1)
            m2.mul_(b2).addcmul_(g, g, value=1 - b2)
            theta = theta - lr * (m1 / (1 - b1 ** k)) / ((m2 / (1 - b2 ** k)).sqrt() + 1e-8)
        if k % a.every == 0 and check(k, norm)["verified"]:
            break
    return _write(a, rows)


def _write(a, rows: list[dict]) -> int:
    if a.results:
        a.results.mkdir(parents=True, exist_ok=True)
        args = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}
        name = "repair-probe-" + "-".join(f"{k}{v}" for k, v in sorted(args.items()) if k not in ("work", "results"))
        (a.results / f"{name}.json").write_text(json.dumps({"run": a.work.name, "args": args, "trajectory": rows,
                                                             "date": time.strftime("%Y-%m-%d")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
