"""`unlearn` on a demo's request with the base in several dtypes, against float32 and against a training step.

    python -m benchmarks.dtype_check --run runs/demo-quick --device cpu --dtypes float32 bfloat16 float32-ckpt --out OUT

RUN is a `llmeraser demo` folder (its inputs/ and original/). A dtype with "-ckpt" also turns on activation
checkpointing (of `unlearn` and of the training step). Each one's `unlearn` (the `memorised` recipe with the demo's
Newton steps, verify check) and one training step (a batch of the recipe's size, the original's settings, 1
optimiser update) run as separate processes, so each peak is its own process's: the caching
allocator's max on CUDA, the resident set's max on CPU (model load included, for both). Prints and writes
OUT/dtype_check.json: seconds, peaks, the cosine of each Δ to the float32 Δ, and each run's verification.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def step_peak(base: str, run: Path, device: str, dtype: str, checkpointing: bool = False) -> dict:
    """One training step on `batch_size` records of the demo's data: (seconds, peak MiB) of this process."""
    import torch

    from llmeraser.data import load_records
    from llmeraser.modeling import checkpointed, load_adapter, load_base, resolve_dtype
    from llmeraser.report import peak_memory_mb
    from llmeraser.train import TrainSettings, train_lora

    args = json.loads((run / "original" / "train.json").read_text())["arguments"]
    settings = TrainSettings(**args)
    dev = torch.device(device)
    model, tok = load_base(base, dev, resolve_dtype(dtype, dev))
    peft = load_adapter(model, run / "original")
    records = load_records(run / "inputs" / "data.jsonl")[: settings.batch_size]
    t0 = time.perf_counter()
    with checkpointed(peft, checkpointing):
        loss = train_lora(peft, tok, records, settings, progress=False, max_steps=1)
    return {"seconds": time.perf_counter() - t0, "peak_mb": peak_memory_mb(dev), "loss": loss[0]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, type=Path, help="a `llmeraser demo` output folder")
    ap.add_argument("--base", default="smollm2", help="the demo's base (default: smollm2)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--step", action="store_true", help=argparse.SUPPRESS)  # internal: one training step, json to stdout
    ap.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.step:
        dtype, _, ckpt = a.dtype.partition("-")
        print(json.dumps(step_peak(a.base, a.run, a.device, dtype, ckpt == "ckpt")))
        return 0
    from llmeraser.demo import FULL, QUICK
    from llmeraser.verify import summary_line

    quick = json.loads((a.run / "demo_summary.json").read_text()).get("quick", True) if (a.run / "demo_summary.json").is_file() else True
    steps = (QUICK if quick else FULL).newton_steps
    a.out.mkdir(parents=True, exist_ok=True)
    results = {"run": str(a.run), "device": a.device, "newton_steps": steps, "dtypes": {}}
    for variant in a.dtypes:
        dtype, _, ckpt = variant.partition("-")
        config = a.out / f"config-{variant}.json"
        # verify 'check': the update's Newton steps compared across dtypes, without --verify until's rounds of Adam steps
        config.write_text(json.dumps({"recipe": "memorised", "settings": {"newton_steps": steps, "checkpointing": ckpt == "ckpt",
                                                                         "verify": "check"}}))
        out = a.out / f"unlearn-{variant}"
        cmd = [sys.executable, "-m", "llmeraser", "unlearn", "--base", a.base, "--adapter", str(a.run / "original"),
               "--data", str(a.run / "inputs" / "data.jsonl"), "--request", str(a.run / "inputs" / "request.jsonl"),
               "--out", str(out), "--overwrite", "--config", str(config), "--device", a.device, "--dtype", dtype,
               "--allow-unconverged", "--quiet"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode not in (0, 4):
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"unlearn {variant} failed with exit {proc.returncode}")
        meta = json.loads((out / "unlearn.json").read_text())
        step = subprocess.run([sys.executable, "-m", "benchmarks.dtype_check", "--step", "--run", str(a.run), "--base",
                               a.base, "--device", a.device, "--dtype", variant, "--out", str(a.out)],
                              capture_output=True, text=True)
        if step.returncode != 0:
            print(step.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"the training step in {variant} failed")
        train_step = json.loads(step.stdout.strip().splitlines()[-1])
        v = meta.get("verification") or {}
        results["dtypes"][variant] = {
            "wall_seconds": wall, "seconds": meta["seconds"], "peak_mb": meta["peak_memory_mb"],
            "training_step": train_step, "peak_over_training_step": meta["peak_memory_mb"] / train_step["peak_mb"],
            "memory": meta.get("memory"), "verified": v.get("verified"), "verification": summary_line(v) if v else None,
            "hvp_mode": meta["solver"].get("hvp_mode"), "iterations": [s.get("iterations") for s in meta["newton_steps"]]}
    results["cosine_to_float32"] = cosines(a.run / "original", a.out, a.dtypes)
    (a.out / "dtype_check.json").write_text(json.dumps(results, indent=1))
    for dtype, r in results["dtypes"].items():
        print(f"{dtype:13s} unlearn {r['wall_seconds']:7.1f} s (solve {r['seconds'].get('solve', 0):.1f} s)  peak "
              f"{r['peak_mb']:8.0f} MiB = {r['peak_over_training_step']:.2f}x a training step ({r['training_step']['peak_mb']:.0f} MiB, "
              f"{r['training_step']['seconds']:.2f} s)  verified {r['verified']}  cos(Δ, Δ_fp32) "
              f"{results['cosine_to_float32'].get(dtype, float('nan')):.5f}")
    return 0


def cosines(original: Path, out: Path, dtypes: list[str]) -> dict:
    """cos(Δ_dtype, Δ_float32), Δ = written adapter − original, over every tensor."""
    import torch
    from safetensors.torch import load_file

    old = load_file(str(original / "adapter_model.safetensors"))

    def delta(dtype):
        new = load_file(str(out / f"unlearn-{dtype}" / "adapter_model.safetensors"))
        return torch.cat([(new[k].double() - old[k].double()).reshape(-1) for k in sorted(old)])

    if "float32" not in dtypes:
        return {}
    ref = delta("float32")
    return {d: float(torch.nn.functional.cosine_similarity(delta(d), ref, 0)) for d in dtypes}


if __name__ == "__main__":
    raise SystemExit(main())
