"""Several processes (torchrun, accelerate launch): who this process is, its share of the samples, and sums.

Every quantity of the method is a sum over samples: b, each curvature product over the fixed batches, the
line search's and the objective's losses, the reset's terms. With K processes, rank r takes the samples
r, r+K, r+2K, … of the (length-sorted, seeded) list a single process would batch, batches only those, and

    Σ_all = all_reduce(Σ_{rank's share}, SUM)

so every rank holds the same sum, runs the same solver iterations and ends with the same ΔΘ; only the order
of summation differs from one process (float64: agreement to ~1e-15 relative; docs/design.md#distributed).
Without a process group every function here is the identity, and a single process runs exactly as before.
Random draws (the curvature sample, the line-search sample) come from seeded generators, so every rank draws
the same subset before taking its share of it.
"""

from __future__ import annotations

import datetime
import os
import pickle

import torch

try:
    import torch.distributed as dist
except ImportError:  # pragma: no cover - a torch built without distributed support
    dist = None


def active() -> bool:
    """Whether a process group with more than one process is initialised."""
    return dist is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes files, logs at INFO and draws progress bars."""
    return rank() == 0


def launched() -> bool:
    """Whether a launcher (torchrun, accelerate launch) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(timeout_s: float = 1800.0) -> bool:
    """Join the process group a launcher describes in RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT.

    gloo for CPU tensors, NCCL for CUDA tensors where CUDA is available (each rank on the GPU LOCAL_RANK, so
    'auto' and 'cuda' mean that GPU). Returns whether a group was created here (the caller then destroys it)."""
    if not launched() or dist is None or dist.is_initialized():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return True


def shutdown() -> None:
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(items: list) -> list:
    """This rank's share of `items`: items r, r+K, … (balanced to one item; the list itself with one process).

    Taken from the length-sorted list, so every rank's batches are about as long as a single process's."""
    return items[rank()::size()] if active() else items


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Σ over ranks of `t`, the same on every rank (in place; `t` itself with one process)."""
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_sum_float(x: float) -> float:
    """Σ over ranks of a float, in float64 (the float itself with one process)."""
    if not active():
        return x
    # a group of NCCL alone (a caller's own init) reduces CUDA tensors only
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    return float(all_sum(torch.tensor([x], dtype=torch.float64, device=device)))


def broadcast_(t: torch.Tensor) -> torch.Tensor:
    """`t` replaced by rank 0's (in place)."""
    if active():
        dist.broadcast(t, src=0)
    return t


def on_main(fn):
    """fn() run on rank 0 only; every rank returns its result, or raises its error.

    For what touches the output folder (checks that remove stale staging folders, the atomic write): the
    other ranks wait here, and an error on rank 0 reaches them as the same exception instead of leaving
    them blocked in a later collective."""
    if not active():
        return fn()
    box = [None]
    if rank() == 0:
        try:
            box[0] = ("ok", fn())
        except BaseException as e:  # noqa: BLE001 - re-raised below, after the others are told
            box[0] = ("error", _portable(e))
            dist.broadcast_object_list(box, src=0)
            raise
        dist.broadcast_object_list(box, src=0)
        return box[0][1]
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value


def _portable(e: BaseException) -> BaseException:
    """`e` if it survives pickling, else a RuntimeError carrying its message."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001
        return RuntimeError(f"rank 0: {type(e).__name__}: {e}")
