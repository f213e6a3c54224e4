"""train.json, the record `llmeraser train` writes beside an adapter, read and checked in one place.

`unlearn` needs three facts from it: the training L2 coefficient wd (the Hessian of the training
objective is H + wd·I, so wd is part of the damping), and the data's SHA-256 and size n (ΔΘ is
scaled by 1/n and b is taken over that data, so other data gives a wrong update without any error).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError
from .fileio import loads_json, read_text

FILE = "train.json"


@dataclass(frozen=True)
class TrainRecord:
    path: Path
    weight_decay: float = 0.0
    n: int | None = None
    data_sha256: str | None = None
    arguments: dict = field(default_factory=dict)

    @classmethod
    def read(cls, adapter_dir: str | Path) -> "TrainRecord | None":
        """The adapter's train.json, or None when it has none (an adapter trained elsewhere)."""
        path = Path(adapter_dir) / FILE
        if not path.is_file():
            return None
        try:
            raw = loads_json(read_text(path, "the adapter's training record"))
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: not valid JSON ({e}); repair it or move it out of the adapter folder") from None
        if not isinstance(raw, dict):
            raise InputError(f"{path}: must be a JSON object; repair it or move it out of the adapter folder")
        args = raw.get("arguments", {})
        if not isinstance(args, dict):
            raise InputError(f"{path}: 'arguments' must be an object of training settings")
        wd = args.get("weight_decay", 0.0)
        if wd is None:
            wd = 0.0
        if isinstance(wd, bool) or not isinstance(wd, (int, float)) or not math.isfinite(wd) or wd < 0:
            raise InputError(f"{path}: arguments.weight_decay = {wd!r}; it must be a finite number >= 0 (the L2 "
                             "coefficient the adapter was trained with; 0 if none)")
        n = raw.get("n")
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise InputError(f"{path}: n = {n!r}; it must be the number of training records, an integer >= 1")
        sha = raw.get("data_sha256")
        if sha is not None and not isinstance(sha, str):
            raise InputError(f"{path}: data_sha256 must be a string")
        return cls(path, float(wd), n, sha, args)

    def check_data(self, data: str | Path, data_sha256: str, n: int) -> None:
        """Refuse data that is not what the adapter was trained on (by SHA-256, else by size)."""
        if self.data_sha256 is not None and self.data_sha256 != data_sha256:
            raise InputError(f"--data {data} is not the data this adapter was trained on: its SHA-256 differs from "
                             f"the one in {self.path}" + (f" ({n} records here, {self.n} there)" if self.n not in (None, n) else "")
                             + ". The update is a sum over the training data scaled by 1/n, so other data gives a wrong "
                               "adapter. Give the training data, or pass --allow-other-data if this is intended "
                               "(e.g. the same records re-encoded)")
        if self.n is not None and self.n != n:
            raise InputError(f"--data {data} has {n} records but {self.path} says the adapter was trained on {self.n}; "
                             "give the training data, or pass --allow-other-data if this is intended")

