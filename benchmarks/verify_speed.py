"""What the teacher-forced shortcut of `--verify` saves: one check of an edit, with and without it.

    python -m benchmarks.verify_speed --adapter ORIGINAL --edited NEW --data data.jsonl --request request.jsonl

Builds verify.Verifier twice on the same model (the probes' answers at the original adapter Θ̂ are its first
check), checks the edited adapter with each, and prints the seconds, the prompts generated and whether the two
gave the same answer for every probe. A result JSON goes to --results. Figures: docs/benchmarks-history.md#verify-speed.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python -m benchmarks.verify_speed")
    ap.add_argument("--base", default="smollm2", help="base model (default: smollm2)")
    ap.add_argument("--adapter", required=True, help="the original adapter (Θ̂)")
    ap.add_argument("--edited", required=True, help="the adapter after the edit (Θ), e.g. unlearn's output")
    ap.add_argument("--data", required=True, help="the training data")
    ap.add_argument("--request", required=True, help="the edit request")
    ap.add_argument("--retained", type=int, default=64, help="kept records sampled (default: 64, verify_retained)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="the base model's dtype")
    ap.add_argument("--max-length", type=int, default=512, help="token limit per sample (default: 512)")
    ap.add_argument("--results", default=None, help="write the figures as JSON here")
    args = ap.parse_args(argv)

    from llmeraser.data import load_records, load_request
    from llmeraser.modeling import load_adapter, load_base, theta_of, unload_adapter
    from llmeraser.render import resolve_template
    from llmeraser.verify import Verifier

    base, tok = load_base(args.base, "cpu", getattr(torch, args.dtype))
    edited = load_adapter(base, args.edited)
    theta = theta_of(edited)[1].clone()
    model = load_adapter(unload_adapter(edited), args.adapter)
    model.eval()
    params, theta_hat = theta_of(model)
    records = load_records(args.data)
    request = load_request(args.request, records)
    template = resolve_template(tok, "auto")
    out = {}
    for name, shortcut in (("teacher_forced", True), ("generate_all", False)):
        t0 = time.perf_counter()
        v = Verifier(model, tok, params, theta_hat, records, request, template, args.max_length, 8, args.retained, 0,
                     teacher_forced=shortcut)
        t1 = time.perf_counter()
        before_generated = v.generated
        check = v.check(theta)
        t2 = time.perf_counter()
        out[name] = {"seconds_at_original": t1 - t0, "generated_at_original": before_generated,
                     "seconds_at_edited": t2 - t1, "generated_at_edited": check["generated"], "prompts": check["prompts"],
                     "verified": check["verified"], "records": check["records"]}
        print(f"{name}: {check['prompts']} prompts; at the original {t1 - t0:.1f} s ({before_generated} generated), "
              f"at the edited {t2 - t1:.1f} s ({check['generated']} generated); verified {check['verified']}", flush=True)
    same = out["teacher_forced"]["records"] == out["generate_all"]["records"]
    print(f"same answer for every probe: {same}")
    if args.results:
        for o in out.values():
            o.pop("records")
        meta = {"date": date.today().isoformat(), "machine": platform.platform(), "threads": torch.get_num_threads(),
                "dtype": args.dtype, "n": len(records), "edits": len(request.edits), "same_hits": same, **out}
        Path(args.results).parent.mkdir(parents=True, exist_ok=True)
        Path(args.results).write_text(json.dumps(meta, indent=1) + "\n")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
