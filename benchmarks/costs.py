"""Cost probes for the paper benchmarks: peak memory of a stage, and an HVP's cost against a gradient."""

from __future__ import annotations

import os
import threading
import time

import torch

from llmeraser.curvature import Curvature
from llmeraser.modeling import theta_of
from llmeraser.objective import CausalLMObjective
from llmeraser.render import encode, resolve_template

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


def _release_freed_memory() -> None:
    """Hand memory freed by earlier stages back to the OS, so the next stage's RSS rise is its own."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the figure is then a lower bound
        pass


class PeakMemory:
    """Peak memory a stage adds above what the process held when it began, in MiB.

    On CUDA: torch's peak allocation. On CPU: the resident set size, sampled every 5 ms by a thread
    (ru_maxrss is a whole-process high-water mark, useless for comparing stages of one process).
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.peak_mb = 0.0

    def __enter__(self):
        _release_freed_memory()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device) / 2**20
            return self
        self.start, self.high, self.stop = rss_mb(), rss_mb(), threading.Event()

        def watch():
            while not self.stop.wait(0.005):
                self.high = max(self.high, rss_mb())

        self.thread = threading.Thread(target=watch, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20 - self.start
        else:
            self.stop.set()
            self.thread.join()
            self.peak_mb = max(self.high, rss_mb()) - self.start
        return False


def _sync() -> None:
    """CUDA runs kernels asynchronously: a timer must wait for them, or it times their launch."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _timed(fn, repeats: int, warm_up: bool = True) -> float:
    if warm_up:
        fn()  # allocator, kernels
    times = []
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _cached_product_s(ggn: Curvature, batch: dict, v, repeats: int, warm_up: bool) -> float:
    linear = ggn.linearise(batch)  # held only while timed: it keeps the batch's graphs alive
    try:
        return _timed(lambda: linear(v), repeats, warm_up)
    finally:
        del linear


def gradient_peak_mb(gradient, device, measures: int = 3) -> tuple[float, list[float]]:
    """The memory one gradient adds: the least of `measures` readings, and the readings.

    It is the denominator of every "peak memory over a training step" figure, and on the CPU one reading is
    noisy: five gradients on IR's batch in one fresh process read 2,519, 3,945, 3,580, 3,609 and 3,524 MB, and
    the suite's probe once read 4,378 MB (BENCHMARKS.md, seventeenth session). The RSS rise is the step's
    need plus what the allocator happens to take from the system. The least reading is the closest to the
    need and never flatters a ratio taken over it."""
    peaks = []
    for _ in range(measures):
        with PeakMemory(device) as mem:
            gradient()
        peaks.append(mem.peak_mb)
    return min(peaks), peaks


def hvp_cost(model, tokenizer, records, batch_size: int = 8, max_length: int = 512, repeats: int = 3, warm_up: bool = True,
             products: bool = True) -> dict:
    """Median seconds of a plain gradient, a fresh GGN product (J v by forward mode where it works, as unlearn
    takes it; and by the double-vjp trick), a cached-linearisation GGN product and a double-backprop Hessian
    product on the same batch of `records`, and each as a multiple of the gradient; and the peak memory a
    gradient (a training step's forward and backward) and each fresh GGN product add."""
    params, theta = theta_of(model)
    obj = CausalLMObjective(model, tokenizer.pad_token_id)
    tpl = resolve_template(tokenizer, "auto")
    device = next(model.parameters()).device
    batch = obj.collate([encode(r, tokenizer, tpl, max_length) for r in records[:batch_size]], device)
    v = torch.randn(theta.numel(), generator=torch.Generator().manual_seed(0)).to(theta)

    def gradient():
        with torch.enable_grad():
            t = theta.clone().requires_grad_(True)
            loss = obj.losses(obj.outputs(params.unflatten(t), batch), batch).mean()
            torch.autograd.grad(loss, t)

    ggn = Curvature(obj, params, theta, "ggn")
    hess = Curvature(obj, params, theta, "hessian", "rev_rev")
    least, peaks = gradient_peak_mb(gradient, device, measures=3 if warm_up else 1)
    head = {"batch_size": batch["n"], "tokens": int(batch["attention_mask"].sum()),
            "gradient_peak_mb": least, "gradient_peak_mb_measured": peaks}
    if not products:  # only what a training step costs in memory
        return head
    ggn_vjp = Curvature(obj, params, theta, "ggn", "rev_rev")
    with PeakMemory(device) as ggn_mem:
        ggn(v, batch)
    with PeakMemory(device) as vjp_mem:
        ggn_vjp(v, batch)
    out = {**head, "ggn_peak_mb": ggn_mem.peak_mb, "ggn_mode": ggn.mode, "ggn_double_vjp_peak_mb": vjp_mem.peak_mb,
           "gradient_s": _timed(gradient, repeats, warm_up),
           "ggn_s": _timed(lambda: ggn(v, batch), repeats, warm_up),
           "ggn_double_vjp_s": _timed(lambda: ggn_vjp(v, batch), repeats, warm_up),
           "ggn_cached_s": _cached_product_s(ggn, batch, v, repeats, warm_up),
           "hessian_rev_rev_s": _timed(lambda: hess(v, batch), repeats, warm_up)}
    for k in ("ggn", "ggn_double_vjp", "ggn_cached", "hessian_rev_rev"):
        out[f"{k}_over_gradient"] = out[f"{k}_s"] / out["gradient_s"]
    return out
