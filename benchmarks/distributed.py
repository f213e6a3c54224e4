"""`unlearn` as one process and as K processes under torchrun, on a demo run's inputs: wall time, the stages'
seconds, curvature products per process, and how far the two results are apart.

    python -m benchmarks.distributed --run runs/demo --out /tmp/dist-bench [--nproc 2]

RUN is a folder `llmeraser demo` wrote (inputs/data.jsonl, inputs/request.jsonl, the adapter original/). The
settings are those of RUN's own llmeraser run (adapters/llmeraser/unlearn.json) when it has one, else the
`memorised` recipe. Each command is timed whole (start, imports, model load, unlearn, write), as a user sees it.
One process uses torch's default threads; torchrun gives each of its processes one (OMP_NUM_THREADS=1).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def command(run: Path, out: Path, nproc: int) -> list[str]:
    launcher = [sys.executable, "-m", "llmeraser"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "-m", "llmeraser"]
    config = run / "adapters" / "llmeraser" / "unlearn.json"
    settings = ["--config", str(config)] if config.is_file() else ["--recipe", "memorised"]
    return [*launcher, "unlearn", "--base", "smollm2", "--adapter", str(run / "original"),
            "--data", str(run / "inputs" / "data.jsonl"), "--request", str(run / "inputs" / "request.jsonl"),
            "--out", str(out), "--quiet", "--allow-unconverged", *settings]


def timed(run: Path, out: Path, nproc: int) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run(command(run, out, nproc), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode not in (0, 4):  # 4: written, the checks of --verify until (the memorised recipe's) not passed
        raise SystemExit(f"{nproc} process(es) failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    meta = json.loads((out / "unlearn.json").read_text())
    return {"processes": nproc, "wall_s": wall, "seconds": meta["seconds"], "iterations": meta["solver"]["iterations"],
            "hvps_per_process": meta["solver"]["hvps"],
            "hvps_all_processes": meta["solver"].get("hvps_all_processes", meta["solver"]["hvps"]),
            # a gradient round of --verify until has no solve: its iterations and scale are None
            "steps": [(s["step"], s.get("iterations"), (s.get("line_search") or {}).get("scale")) for s in meta["newton_steps"]],
            "delta_norm": meta["delta_norm"], "out": str(out)}


def difference(a: Path, b: Path) -> float:
    """max |Θ_a − Θ_b| / max |Θ_a| over the adapters' tensors."""
    from safetensors.torch import load_file

    ta, tb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    diff = max(float((ta[k].double() - tb[k].double()).abs().max()) for k in ta)
    return diff / max(float(t.abs().max()) for t in ta.values())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, type=Path, help="a folder `llmeraser demo` wrote")
    p.add_argument("--out", required=True, type=Path, help="a new folder for the adapters and results.json")
    p.add_argument("--nproc", type=int, default=2)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True)
    rows = [timed(args.run, args.out / "p1", 1), timed(args.run, args.out / f"p{args.nproc}", args.nproc)]
    result = {"rows": rows, "relative_difference": difference(args.out / "p1", args.out / f"p{args.nproc}")}
    (args.out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    print("| processes | wall s | b s | solve s | CG iterations (step 1) | products per process | products, all | |ΔΘ| |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['processes']} | {r['wall_s']:.1f} | {r['seconds']['b']:.1f} | {r['seconds']['solve']:.1f} | "
              f"{r['steps'][0][1]} | {r['hvps_per_process']} | {r['hvps_all_processes']} | {r['delta_norm']:.6g} |")
    print(f"max |Θ₁ − Θ_{args.nproc}| / max |Θ₁| = {result['relative_difference']:.3g}")


if __name__ == "__main__":
    main()
