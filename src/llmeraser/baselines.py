"""Adapters to compare `unlearn` with: training from scratch, retraining, and cheap alternatives.

Each writes a PEFT adapter folder plus a json with its arguments, seconds and peak memory,
atomically, never touching its inputs. Under torchrun every rank trains (data-parallel, train.py) and
rank 0 alone checks and writes the output folder.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import distributed
from .data import Record, apply_request, load_records, load_request, records_jsonl
from .errors import InputError
from .fileio import atomic_dir, check_output_dir, sha256_file, write_json
from .items import attach, attach_items, frozen_tensors, read_item_table, save_modules
from .modeling import (DTYPE_CHOICES, adapter_weights_path, check_adapter, check_base, check_device, check_dtype, checkpointed,
                       load_adapter, load_base, resolve_device, resolve_dtype, unload_adapter)
from .train import TrainSettings, add_lora, mean_loss, train_lora
from .trainrecord import TrainRecord
from .report import peak_memory_mb
from .report import versions as _versions

BASELINES = ("retrain", "gradient-ascent", "finetune-corrected")


def _loaded(base, device, model_and_tokenizer, dtype: str = "auto"):
    if model_and_tokenizer is not None:
        return model_and_tokenizer
    device = resolve_device(device)
    return load_base(base, device, resolve_dtype(dtype, device))


def _preflight(base, device, model_and_tokenizer, dtype: str = "auto") -> None:
    """Checks of --base, --device and --dtype that need no model, made before any training."""
    resolve_device(device)
    check_dtype(dtype)
    if model_and_tokenizer is None:
        check_base(base)


def train(base: str, data, out, settings: TrainSettings | None = None, overwrite: bool = False, device: str = "auto",
          progress: bool = True, model_and_tokenizer=None, extra: dict | None = None, records: list[Record] | None = None,
          dtype: str = "auto", checkpointing: bool = False, item_table=None, modules_from=None) -> Path:
    """LoRA fine-tuning; writes the adapter and train.json (arguments, data SHA-256, loss, seconds, memory).

    `records`: train on these instead of reading `data` (then `data` is only recorded, and train.json's
    data_sha256 is the SHA-256 of the records as JSONL); `retrain` uses it so no copy of the edited
    data is ever written to disk. `dtype`: the base's (modeling.resolve_dtype); the LoRA weights stay float32.
    `checkpointing`: activation checkpointing of the decoder layers (modeling.checkpointed; the same updates).
    `item_table`: a safetensors item table, for prompts with item slots: trains a projector with the LoRA tensors
    and saves both (items.py). `modules_from`: an adapter folder whose modules to train afresh (retraining: the
    same declaration and frozen tables, the trainable tensors initialised with the recipe's seed)."""
    settings = settings or TrainSettings()
    inputs = (data, base)
    out = distributed.on_main(lambda: check_output_dir(out, overwrite, inputs=inputs))
    _preflight(base, device, model_and_tokenizer, dtype)
    if item_table is not None:
        read_item_table(item_table)  # checked before the model is loaded
    if records is None:
        records, data_sha256 = load_records(data), sha256_file(data)
    else:
        data_sha256 = hashlib.sha256(records_jsonl(records).encode("utf-8")).hexdigest()
    t0 = time.perf_counter()
    base_model, tok = _loaded(base, device, model_and_tokenizer, dtype)
    model = add_lora(base_model, settings)
    try:
        inherited = frozen_tensors(modules_from) if modules_from is not None and item_table is None else None
        if item_table is not None:
            attach_items(model, tok, item_table, seed=settings.seed)
        elif inherited is not None:
            attach(model, *inherited, seed=settings.seed)
        with checkpointed(model, checkpointing):
            history = train_lora(model, tok, records, settings, progress)
        seconds = time.perf_counter() - t0
        final = mean_loss(model, tok, records, settings)

        def write():
            with atomic_dir(out, overwrite, inputs) as tmp:
                model.save_pretrained(tmp)
                save_modules(model, tmp)
                write_json(tmp / "train.json", {
                    "arguments": settings.to_dict(), "base": base, "data": str(Path(data).resolve()),
                    "data_sha256": data_sha256, "n": len(records), "final_loss": final,
                    "loss_history": history, "seconds": seconds, "peak_memory_mb": peak_memory_mb(next(model.parameters()).device),
                    "base_dtype": str(base_model.dtype).removeprefix("torch."), "versions": _versions(), **(extra or {})})
        distributed.on_main(write)
    finally:
        unload_adapter(model)  # give the caller its base model back unchanged
    return out


def trained_with(adapter: str | Path, meta: str = "train.json", **expected) -> bool:
    """Whether `adapter` holds a finished run whose `meta` json (train.json of `train` and `retrain`,
    baseline.json of the cheap baselines) has these values (recipe 'arguments', 'data_sha256',
    'request_sha256', ...): callers that cache adapters reuse it then."""
    path = Path(adapter) / meta
    if not path.is_file():
        return False
    try:
        saved = json.loads(path.read_text())
    except ValueError:
        return False
    return all(saved.get(k) == v for k, v in expected.items())


def recipe_of(adapter: str | Path) -> TrainSettings:
    record = TrainRecord.read(adapter)
    if record is None:
        raise InputError(f"{adapter}: no train.json, so the training recipe is unknown; train the original with "
                         "`llmeraser train`, or write train.json with its 'arguments'")
    try:
        return TrainSettings(**record.arguments)
    except TypeError as e:
        raise InputError(f"{record.path}: its 'arguments' are not `llmeraser train` settings ({e}); repair train.json") from None


@dataclass
class BaselineSettings:
    steps: int = field(default=10, metadata={"help": "optimiser steps of gradient-ascent / finetune-corrected"})
    lr: float | None = field(default=None, metadata={"help": "learning rate of those steps (default: the recipe's)"})
    device: str = field(default="auto", metadata={"help": "'cpu', 'cuda', 'cuda:N', 'mps' or 'auto'"})
    dtype: str = field(default="auto", metadata={
        "help": "the base model's dtype (auto: bfloat16 on CUDA, float32 on CPU/MPS); give retrain the original's",
        "choices": DTYPE_CHOICES})
    checkpointing: bool = field(default=False, metadata={
        "help": "activation checkpointing of the decoder layers: less memory, more time, the same updates"})

    def __post_init__(self):
        check_device(self.device)
        check_dtype(self.dtype)
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise InputError(f"--steps {self.steps}: give an integer >= 1 (optimiser steps of the cheap baselines)")
        if self.lr is not None and not 0 < self.lr < math.inf:
            raise InputError(f"--lr {self.lr}: give a finite number > 0")


def baseline(name: str, base: str, adapter, data, request, out, settings: BaselineSettings | None = None,
             overwrite: bool = False, progress: bool = True, model_and_tokenizer=None) -> Path:
    """Write the adapter of baseline `name` for `request` (see BASELINES)."""
    if name not in BASELINES:
        raise InputError(f"unknown baseline {name!r}; choose one of {BASELINES}")
    st = settings or BaselineSettings()
    steps, lr, device = st.steps, st.lr, st.device
    inputs = (adapter, data, request, base)
    out = distributed.on_main(lambda: check_output_dir(out, overwrite, inputs=inputs))
    _preflight(base, device, model_and_tokenizer, st.dtype)
    check_adapter(adapter)
    records = load_records(data)
    req = load_request(request, records)
    recipe = recipe_of(adapter)
    if name == "retrain":
        # trained from the edited records in memory: no copy of the (private) kept data is ever on disk
        return train(base, data, out, recipe, overwrite, device, progress, model_and_tokenizer,
                     extra={"baseline": "retrain", "request_sha256": req.sha256, "original_data": str(Path(data).resolve()),
                            "original_data_sha256": sha256_file(data)},
                     records=apply_request(records, req), dtype=st.dtype, checkpointing=st.checkpointing, modules_from=adapter)
    # each cheap baseline handles its own part of a mixed request and leaves the rest as it is
    if name == "gradient-ascent":
        targets = [e.old for e in req.edits if e.op == "remove"]
        if not targets:
            raise InputError("gradient-ascent needs removals in the request; use finetune-corrected for query/response edits")
    else:
        targets = [e.new for e in req.edits if e.new is not None]
        if not targets:
            raise InputError("finetune-corrected needs query or response edits; use gradient-ascent for removals")
    t0 = time.perf_counter()
    base_model, tok = _loaded(base, device, model_and_tokenizer, st.dtype)
    model = load_adapter(base_model, adapter)
    try:
        settings = TrainSettings(**{**recipe.to_dict(), "lr": lr or recipe.lr, "batch_size": min(recipe.batch_size, len(targets))})
        with checkpointed(model, st.checkpointing):
            history = train_lora(model, tok, targets, settings, progress, max_steps=steps, ascent=name == "gradient-ascent",
                                 desc=name)
        seconds = time.perf_counter() - t0

        def write():
            with atomic_dir(out, overwrite, inputs) as tmp:
                model.save_pretrained(tmp)
                save_modules(model, tmp)
                write_json(tmp / "baseline.json", {
                    "baseline": name, "adapter": str(Path(adapter).resolve()), "request_sha256": req.sha256,
                    "adapter_sha256": sha256_file(adapter_weights_path(adapter)), "data_sha256": sha256_file(data),
                    "steps": steps, "lr": settings.lr, "samples": len(targets), "edits_ignored": len(req.edits) - len(targets),
                    "loss_history": history, "seconds": seconds,
                    "peak_memory_mb": peak_memory_mb(next(model.parameters()).device), "versions": _versions()})
        distributed.on_main(write)
    finally:
        unload_adapter(model)
    return out
