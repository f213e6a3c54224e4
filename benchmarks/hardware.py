"""--device and --dtype for the scenario benchmarks (forgetting.py, llara.py, multimodal.py): the same scenario on
this machine's CPU and on a GPU when one is lent. Every stage of a scenario shares one loaded base, so its device
and dtype decide where training, retraining, `unlearn`, the baselines and generation run."""

from __future__ import annotations

import argparse


def add_args(ap: argparse.ArgumentParser) -> None:
    from llmeraser.modeling import DTYPE_CHOICES

    ap.add_argument("--device", default="cpu", help="where every stage runs: cpu (default), cuda, cuda:N, mps or auto")
    ap.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                    help="the base model's dtype; the adapter's maths stay float32 (auto: bfloat16 on CUDA, float32 on CPU)")


def load(base: str, device: str = "cpu", dtype: str = "auto"):
    """(model, tokenizer) of `base` on `device` in `dtype` (the names --device and --dtype take)."""
    from llmeraser.modeling import load_base, resolve_device, resolve_dtype

    dev = resolve_device(device)
    return load_base(base, dev, resolve_dtype(dtype, dev))


def of(mt) -> tuple[str, str]:
    """(device, dtype) names of a loaded base, for the settings each stage records: e.g. ("cuda:0", "bfloat16")."""
    p = next(mt[0].parameters())
    return str(p.device), str(p.dtype).removeprefix("torch.")
