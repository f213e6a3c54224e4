"""One memory budget for what `unlearn` keeps between passes, and out-of-memory told apart from other errors.

Kept between passes (each is a saving of time bought with memory, and each is optional):
  * "linearisation": a fixed curvature batch's Gauss-Newton graph (curvature.HessianOperator), which makes
    every later product on it two backward passes instead of a forward and three;
  * "reset": the removed records' linearisations of the reset term (reset.OutputReset).
Each is built through `MemoryBudget.keep`, which measures what the build took, keeps it only while the kept
total stays within the budget and a fresh product still fits beside it, and turns an out-of-memory error
*while building* into "not kept" (a warning, and fresh products from then on). An out-of-memory error anywhere
else is the user's to fix (smaller --batch-size, --dtype bfloat16, a larger device) and is never read as a
missing forward-mode rule (curvature.Curvature). docs/design.md#memory-budget.
"""

from __future__ import annotations

import gc
import logging
from typing import Callable, TypeVar

import torch

log = logging.getLogger(__name__)
T = TypeVar("T")

# the automatic budget: this share of the memory free when the run starts
AUTO_SHARE = 0.5
# a build starts only with this many times its expected cost free: with 2×, two kept linearisations ran a 24 GB
# host out of memory (docs/design.md#kept-linearisations)
START_ROOM = 3.0


def is_out_of_memory(e: BaseException) -> bool:
    """Whether `e` is an allocator's out-of-memory (CUDA, MPS, or the host's), whatever class carries it."""
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(e).lower()
    return (isinstance(e, RuntimeError) and not isinstance(e, NotImplementedError)  # a missing rule is never a full device
            and ("out of memory" in text or "can't allocate memory" in text))


def used_mb(device) -> tuple[float, float]:
    """(MiB this process holds now, the most it has held), from the caching allocator on CUDA and from the
    resident set on CPU (nan where unknown). Their difference bounds what any later pass briefly took."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20, torch.cuda.max_memory_allocated(device) / 2**20
    if device.type == "cpu":
        try:
            import resource

            with open("/proc/self/statm") as f:
                rss = int(f.read().split()[1]) * resource.getpagesize() / 2**20
            return rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        except (OSError, ValueError, IndexError):
            pass
    return float("nan"), float("nan")


def free_mb(device) -> float:
    """Memory free for new tensors, in MiB.

    CUDA: the driver's free memory plus what PyTorch's caching allocator reserved and does not use (that part is
    free to this process but invisible to `mem_get_info`). CPU: the host's MemAvailable. Elsewhere: unknown (inf)."""
    device = torch.device(device)
    if device.type == "cuda":
        idle = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return (torch.cuda.mem_get_info(device)[0] + idle) / 2**20
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            pass
    return float("inf")


def release_cached(device) -> None:
    """Hand the caching allocator's unused blocks back after an out-of-memory, so the fallback can run."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


class MemoryBudget:
    """The MiB `unlearn` may keep between passes, and what it keeps, by kind.

    `budget_mb` 0 is automatic: AUTO_SHARE of the memory free at construction. `meter` (device -> free MiB) and
    `usage` (device -> (held, peak) MiB) are `free_mb` and `used_mb`, replaceable in tests."""

    def __init__(self, device, budget_mb: float = 0.0, meter: Callable[[object], float] = free_mb,
                 usage: Callable[[object], tuple[float, float]] = used_mb):
        self.device, self.meter, self.usage = device, meter, usage
        self.automatic = not budget_mb
        self.budget_mb = AUTO_SHARE * meter(device) if self.automatic else float(budget_mb)
        self.kept_mb = 0.0
        self.peak_kept_mb = 0.0
        self.kept: dict[str, dict] = {}  # kind -> {"count", "mb"} now held
        self.kept_in_all: dict[str, int] = {}  # kind -> how many were kept over the run
        self.refused: dict[str, int] = {}  # kind -> builds not kept (over the budget, or no room beside them)
        self.out_of_memory: list[str] = []  # kinds whose build ran out of memory (each time: a warning)
        self._built: dict[str, float] = {}  # kind -> the most one build of it has taken
        self._measured: dict[str, float] = {}  # kind -> an upper bound on what one run of it briefly took

    def estimate(self, kind: str) -> float:
        """MiB one build of `kind` is expected to take (0: unknown). Before any build: a built linearisation's cost
        for the other kinds of linearisation, else twice a gradient's peak rise (a kept linearisation holds the
        forward's saved activations and a backward's graph, each about what a gradient briefly holds)."""
        if kind in self._built:
            return self._built[kind]
        if "linearisation" in self._built:
            return self._built["linearisation"]
        return 2.0 * self._measured.get("gradient", 0.0)

    def measure(self, kind: str, run: Callable[[], T]) -> T:
        """`run()`, noting an upper bound on what it briefly took: the process's peak after it minus what it held
        before (b's gradients measure "gradient", so the first build of a run is checked like every later one)."""
        before = self.usage(self.device)[0]
        out = run()
        rise = self.usage(self.device)[1] - before
        if rise == rise:  # not nan
            self._measured[kind] = max(self._measured.get(kind, 0.0), rise, 0.0)
        return out

    def keep(self, kind: str, build: Callable[[], T]) -> tuple[T | None, float]:
        """(the built thing, its MiB) when it may be kept, else (None, 0): then the caller computes afresh.

        Refused without building when the expected cost (`estimate`) would not fit in what is left of the budget,
        or when less than START_ROOM times it is free. After the build, what it took is measured, and it is kept
        only within the budget and with that much still free beside it: a fresh product on another batch builds
        about what one kept linearisation holds (docs/design.md#kept-linearisations)."""
        cost = self.estimate(kind)
        if cost and (self.kept_mb + cost > self.budget_mb or self.meter(self.device) < START_ROOM * cost):
            self.refused[kind] = self.refused.get(kind, 0) + 1
            return None, 0.0
        before = self.meter(self.device)
        try:
            built = build()
        except Exception as e:  # noqa: BLE001 - only an out-of-memory is handled; anything else propagates
            if not is_out_of_memory(e):
                raise
            release_cached(self.device)
            self.out_of_memory.append(kind)
            self._built[kind] = max(cost, self.budget_mb + 1.0)  # not tried again this run
            log.warning("out of memory while building a kept %s (%s); continuing with fresh products, which take "
                        "less memory and more time", kind, str(e).splitlines()[0][:120])
            return None, 0.0
        took = max(before - self.meter(self.device), 0.0)
        self._built[kind] = max(self._built.get(kind, 0.0), took)
        if self.kept_mb + took > self.budget_mb or self.meter(self.device) < took:
            del built
            release_cached(self.device)
            self.refused[kind] = self.refused.get(kind, 0) + 1
            log.info("not keeping a %s of ~%.0f MiB: over the memory budget (%.0f of %.0f MiB kept)",
                     kind, took, self.kept_mb, self.budget_mb)
            return None, 0.0
        self._add(kind, took)
        return built, took

    def hold(self, kind: str, mb: float) -> bool:
        """Count `mb` MiB of tensors of known size (stored hidden states, cached predictions) as kept, if they fit
        in the budget; False (and nothing counted) when they do not."""
        if self.kept_mb + mb > self.budget_mb:
            self.refused[kind] = self.refused.get(kind, 0) + 1
            return False
        self._add(kind, mb)
        return True

    def _add(self, kind: str, mb: float) -> None:
        self.kept_mb += mb
        self.peak_kept_mb = max(self.peak_kept_mb, self.kept_mb)
        entry = self.kept.setdefault(kind, {"count": 0, "mb": 0.0})
        entry["count"] += 1
        entry["mb"] += mb
        self.kept_in_all[kind] = self.kept_in_all.get(kind, 0) + 1

    def free(self, kind: str, mb: float, count: int = 1) -> None:
        """Give back `count` kept things of `kind` holding `mb` MiB in all."""
        entry = self.kept.get(kind)
        if entry is None:
            return
        entry["count"] = max(entry["count"] - count, 0)
        entry["mb"] = max(entry["mb"] - mb, 0.0)
        self.kept_mb = max(self.kept_mb - mb, 0.0)

    def to_dict(self) -> dict:
        """For unlearn.json: the budget, the most kept at once, what was kept and refused, out-of-memory fallbacks."""
        return {"budget_mb": round(self.budget_mb, 1), "automatic": self.automatic,
                "peak_kept_mb": round(self.peak_kept_mb, 1), "kept": dict(self.kept_in_all),
                "largest_build_mb": {k: round(v, 1) for k, v in self._built.items()},
                "gradient_peak_rise_mb": round(self._measured["gradient"], 1) if "gradient" in self._measured else None,
                "refused": dict(self.refused), "out_of_memory_fallbacks": list(self.out_of_memory)}
