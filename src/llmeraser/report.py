"""UnlearnReport: what `unlearn.json` records, with a schema version and one to/from-dict path."""

from __future__ import annotations

import dataclasses
import json
import platform
import resource
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__
from .errors import InputError

SCHEMA_VERSION = 1


def versions() -> dict:
    import peft
    import transformers

    return {"llmeraser": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "python": sys.version.split()[0], "platform": platform.platform()}


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


@dataclass
class UnlearnReport:
    """One run: its inputs (by path and SHA-256), every resolved setting, the solve and the result's size."""

    recipe: str | None
    settings: dict  # UnlearnSettings.to_dict(): replays the run through --config
    request: dict  # path (or in-memory source), sha256, edits
    data: dict  # path (None in memory), sha256
    n: int
    affected: int
    counts: dict
    parameters: int
    damping: float  # the chosen λ where the settings gave several
    damping_total: float  # λ + the training weight decay
    training_weight_decay: float
    template: str
    truncated_samples: int  # training records and new versions cut to max_length
    truncated_new_versions: int
    solver: dict  # name, iterations, converged, final_residual, residuals, diagnostics
    rhs_norm: float
    newton_steps: list
    reset_removed: dict | None
    delta_norm: float
    theta_norm: float
    converged: bool  # every solve reached tol (a Newton step capped by refine_iters does not count)
    seconds: dict
    versions: dict = field(default_factory=versions)
    adapter: str | None = None
    base: str | None = None
    peak_memory_mb: float | None = None
    verification: dict | None = None  # verify.py's checks and verdict; None with verify off
    memory: dict | None = None  # memory.MemoryBudget.to_dict(): the budget, what was kept, out-of-memory fallbacks
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "unlearn.json") -> "UnlearnReport":
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise InputError(f"{where}: schema_version {version!r}, this llmeraser reads {SCHEMA_VERSION}")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def read(cls, path: str | Path) -> "UnlearnReport":
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")), str(path))
