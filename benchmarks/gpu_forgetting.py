"""The forgetting suite at large n on one GPU, inside a fixed wall-clock budget: several scenarios at once, each in
its own process (a 135M model's training step is bound by kernel launches, so one process leaves the GPU mostly
idle), with the training batch and epochs chosen from a measured step time.

    python -m benchmarks.gpu_forgetting probe --model-dir DIR --out probe.json
    python -m benchmarks.gpu_forgetting run --probe probe.json --base X.gguf --n 512 --budget 520 --out OUT

`probe` times training steps of the real architecture with random weights (DIR holds only its config and tokenizer,
a few MB, so it can run before the weights are on the machine); `run` picks, for the given budget, the smallest
batch whose epochs reach `--min-epochs` (else the largest batch), launches `benchmarks.forgetting` once per
scenario with those settings and a `verify_seconds` cap, and stops every process at the deadline. Each scenario's
result is copied to OUT/results, its log written to OUT/<scenario>.log, with '+' in a name spelled '_' (the device
tool brings back only names of letters, digits, '.', '_' and '-'). The chosen plan is printed and saved (OUT/plan.json).
What one H200 measured with it: BENCHMARKS.md#forgetting-n512-gpu. There, at n = 512, training and retraining took
261 s and the check-only `unlearn` 119 s, so `--verify until` does not fit one 10-minute call with them: a second
`run` (or `benchmarks.forgetting`) on the same --work reuses the cached adapters and goes straight to `unlearn`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import forgetting

DEFAULT_SCENARIOS = ["prompt-code", "chat-code+email", "prompt-email+condition"]


def say(msg: str) -> None:
    print(f"[gpu_forgetting {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def probe(a) -> int:
    """Seconds per training step at each batch size: the suite's recipe and records, random weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from llmeraser.data import records_from_rows
    from llmeraser.modeling import resolve_dtype
    from llmeraser.train import TrainSettings, add_lora, train_lora

    device = torch.device(a.device)
    config = AutoConfig.from_pretrained(a.model_dir)
    tok = AutoTokenizer.from_pretrained(a.model_dir)
    out = {"device": a.device, "n": a.n, "scenario": a.scenario, "seconds_per_step": {}}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    shape, kinds = forgetting.SCENARIOS[a.scenario]
    rows, _, _ = forgetting.build(forgetting.Scenario(a.scenario, shape, kinds, a.n, 0))
    records = records_from_rows(rows)
    layers = config.num_hidden_layers
    for b in a.batch_sizes:
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_config(config, attn_implementation="eager").to(device, resolve_dtype(a.dtype, device))
        recipe = {**forgetting.RECIPE, "batch_size": b, "layers": tuple(range(layers // 2, layers))}
        model = add_lora(base, TrainSettings(**recipe))
        train_lora(model, tok, records, TrainSettings(**recipe), progress=False, max_steps=a.warmup)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        train_lora(model, tok, records, TrainSettings(**recipe), progress=False, max_steps=a.steps)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        out["seconds_per_step"][str(b)] = (time.perf_counter() - t) / a.steps
        say(f"batch {b}: {out['seconds_per_step'][str(b)] * 1000:.1f} ms a step")
        del model, base
    Path(a.out).write_text(json.dumps(out, indent=1))
    return 0


def plan(seconds_per_step: dict, n: int, budget: float, processes: int, min_epochs: float, max_epochs: float,
         train_share: float = 0.55, contention: float = 0.25) -> dict:
    """The batch and epochs that fit the two trainings (original, retraining) into train_share of the budget.

    A step of one process is assumed to take (1 + contention·(processes − 1)) times the probe's; the smallest batch
    reaching min_epochs wins (more updates per epoch memorise faster), else the largest batch."""
    slow = 1 + contention * (processes - 1)
    per_training = train_share * budget / 2
    options = []
    for b in sorted(int(k) for k in seconds_per_step):
        epochs = per_training / (math.ceil(n / b) * seconds_per_step[str(b)] * slow)
        options.append((b, min(max_epochs, math.floor(epochs / 5) * 5)))
    batch, epochs = next(((b, e) for b, e in options if e >= min_epochs), options[-1])
    return {"batch_size": batch, "epochs": epochs, "options": options, "per_training_s": per_training, "slowdown": slow}


def run(a) -> int:
    t0 = time.perf_counter()
    probe_data = json.loads(Path(a.probe).read_text())
    p = plan(probe_data["seconds_per_step"], a.n, a.budget, len(a.scenarios), a.min_epochs, a.max_epochs)
    # extra Newton steps may start until verify_seconds after the first check; what is left covers counting
    p["verify_seconds"] = max(30, round(a.budget * 0.2))
    a.out.mkdir(parents=True, exist_ok=True)
    # one conversion of a GGUF base into the model cache before the processes start, not one per process
    from benchmarks import hardware

    hardware.load(a.base, "cpu", "float32")
    say(f"base loaded once ({time.perf_counter() - t0:.0f} s)")
    (a.out / "plan.json").write_text(json.dumps(p, indent=1))
    say(f"plan: {json.dumps(p)}")
    procs = []
    for name in a.scenarios:
        cmd = [sys.executable, "-m", "benchmarks.forgetting", "--scenarios", name, "--n", str(a.n), "--seeds", *map(str, a.seeds),
               "--epochs", str(p["epochs"]), "--batch-size", str(p["batch_size"]), "--base", a.base, "--device", a.device,
               "--dtype", a.dtype, "--no-progress", "--work", str(a.work), "--results", str(a.work / "results"),
               "--unlearn", f"verify_seconds={p['verify_seconds']}", *a.unlearn]
        log = open(a.out / f"{portable(name)}.log", "w")
        procs.append((name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                             env={**os.environ, "OMP_NUM_THREADS": str(a.threads)}), log))
    while any(pr.poll() is None for _, pr, _ in procs) and time.perf_counter() - t0 < a.budget:
        time.sleep(5)
    for name, pr, log in procs:
        if pr.poll() is None:
            pr.kill()
            say(f"{name}: stopped at the deadline ({a.budget:g} s)")
        else:
            say(f"{name}: exit {pr.returncode}")
        log.close()
    (a.out / "results").mkdir(exist_ok=True)
    for f in sorted((a.work / "results").glob("*")):
        shutil.copyfile(f, a.out / "results" / portable(f.name))
    say(f"done in {time.perf_counter() - t0:.0f} s")
    return 0


def portable(name: str) -> str:
    """A scenario's name as a file name the device tool brings back ('chat-code+email' -> 'chat-code_email')."""
    return name.replace("+", "_")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_forgetting", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("probe", help="seconds per training step at each batch size (random weights)")
    pp.add_argument("--model-dir", required=True, help="a folder with the base's config.json and tokenizer")
    pp.add_argument("--out", required=True, help="where the probe's JSON goes")
    pp.add_argument("--scenario", default="chat-code+email", choices=sorted(forgetting.SCENARIOS), help="whose records")
    pp.add_argument("--n", type=int, default=512, help="records (default: 512)")
    pp.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16, 32], help="batch sizes to time")
    pp.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    pp.add_argument("--steps", type=int, default=30, help="timed steps")
    pp.add_argument("--device", default="cuda", help="device (default: cuda)")
    pp.add_argument("--dtype", default="bfloat16", help="base dtype (default: bfloat16)")
    rp = sub.add_parser("run", help="the suite's scenarios in parallel within a budget")
    rp.add_argument("--probe", required=True, help="the probe's JSON")
    rp.add_argument("--base", required=True, help="the base model (alias or .gguf)")
    rp.add_argument("--scenarios", nargs="+", default=DEFAULT_SCENARIOS, choices=sorted(forgetting.SCENARIOS),
                    help=f"one process each (default: {' '.join(DEFAULT_SCENARIOS)})")
    rp.add_argument("--n", type=int, default=512, help="records per scenario (default: 512)")
    rp.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (default: 0)")
    rp.add_argument("--budget", type=float, default=520, help="seconds until every process is stopped (default: 520)")
    rp.add_argument("--min-epochs", type=float, default=80, help="the smallest batch reaching this many epochs is used (default: 80)")
    rp.add_argument("--max-epochs", type=float, default=150, help="never more epochs than this (default: 150)")
    rp.add_argument("--unlearn", nargs="*", default=[], metavar="KEY=VALUE",
                    help="more unlearn settings for benchmarks.forgetting, e.g. batch_size=32")
    rp.add_argument("--threads", type=int, default=4, help="CPU threads per process (default: 4)")
    rp.add_argument("--work", type=Path, default=Path("/tmp/gpu-forgetting"), help="scratch folder for adapters")
    rp.add_argument("--out", type=Path, required=True, help="plan, logs and results")
    rp.add_argument("--device", default="cuda", help="device (default: cuda)")
    rp.add_argument("--dtype", default="bfloat16", help="base dtype (default: bfloat16)")
    a = ap.parse_args(argv)
    return probe(a) if a.cmd == "probe" else run(a)


if __name__ == "__main__":
    sys.exit(main())
