"""The four adapters the edit scenarios (llara.py, multimodal.py) compare, each stage's seconds and peak memory,
and their greedy answers: the corrupted original, retraining on the clean data, llmeraser (the `default` recipe,
CG capped at 8 iterations as in the paper suite)
and fine-tuning on the corrected records (10 steps)."""

from __future__ import annotations

import json
from pathlib import Path

METHODS = ("original", "retrain", "llmeraser", "finetune-corrected")


def train_and_edit(base: str, work: Path, data: Path, request: Path, settings, mt, progress: bool, say, what: str,
                   **train_kwargs):
    """Train the original (`train_kwargs` go to `train`, e.g. item_table) and retrain unless cached with this
    recipe and data, then run llmeraser and the fine-tuning baseline. Returns (llmeraser's report, peaks): each
    stage's peak memory above what the process held before it (costs.PeakMemory), kept in work/peaks.json for
    the cached adapters."""
    from benchmarks import hardware
    from benchmarks.costs import PeakMemory
    from llmeraser.api import unlearn
    from llmeraser.baselines import BaselineSettings, baseline, train, trained_with
    from llmeraser.fileio import sha256_file, write_text_atomic
    from llmeraser.recipes import recipe
    from llmeraser.solvers import SolverSettings

    device, dtype = hardware.of(mt)
    peaks_file = work / "peaks.json"
    peaks = json.loads(peaks_file.read_text()) if peaks_file.is_file() else {}
    if not trained_with(work / "original", arguments=settings.to_dict(), data_sha256=sha256_file(data), base_dtype=dtype):
        say(f"training the original on {what}")
        with PeakMemory(device) as mem:
            train(base, data, work / "original", settings, overwrite=True, device=device, progress=progress,
                  model_and_tokenizer=mt, dtype=dtype, **train_kwargs)
        peaks["original"] = mem.peak_mb
    if not trained_with(work / "retrain", arguments=settings.to_dict(), request_sha256=sha256_file(request),
                        original_data_sha256=sha256_file(data), base_dtype=dtype):
        say("retrain on the clean data")
        with PeakMemory(device) as mem:
            baseline("retrain", base, work / "original", data, request, work / "retrain",
                     BaselineSettings(device=device, dtype=dtype), overwrite=True, progress=progress, model_and_tokenizer=mt)
        peaks["retrain"] = mem.peak_mb
    write_text_atomic(peaks_file, json.dumps(peaks))
    say("llmeraser")
    # the `default` recipe with the paper suite's cap on CG (8 iterations, as benchmarks/paper.py), at the
    # training's max_length so that every sample is the one trained on
    settings_u = recipe("default", device=device, dtype=dtype, max_length=settings.max_length,
                        solver_settings=SolverSettings(tol=0.05, max_iters=8, check_every=2))
    with PeakMemory(device) as mem:
        res = unlearn(base, work / "original", data, request, work / "llmeraser", settings_u,
                      overwrite=True, progress=progress, model_and_tokenizer=mt, allow_unconverged=True)
    peaks["llmeraser"] = mem.peak_mb
    say("finetune-corrected")
    with PeakMemory(device) as mem:
        baseline("finetune-corrected", base, work / "original", data, request, work / "finetune-corrected",
                 BaselineSettings(steps=10, device=device, dtype=dtype), overwrite=True, progress=progress, model_and_tokenizer=mt)
    peaks["finetune-corrected"] = mem.peak_mb
    return res.report, peaks


def seconds(work: Path, report) -> dict:
    """Each method's seconds: training's and the baselines' from their json, llmeraser's b + solve + save."""
    out = {n: json.loads((work / n / ("train.json" if n in ("original", "retrain") else "baseline.json")).read_text())["seconds"]
           for n in ("original", "retrain", "finetune-corrected")}
    out["llmeraser"] = report.seconds["b"] + report.seconds["solve"] + report.seconds.get("save", 0.0)
    return out


def solver_summary(report) -> dict:
    return {"iterations": report.solver["iterations"], "final_residual": report.solver["final_residual"],
            "parameters": report.parameters, "damping": report.damping}


def generate(base_model, tok, adapter: Path, records, max_new: int, max_length: int) -> list[str]:
    """Greedy answers of the adapter to `records` (llmeraser Records), merged for speed."""
    from llmeraser.evaluate import AdapterEval
    from llmeraser.modeling import fused_attention, load_adapter, merged_adapter, unload_adapter
    from llmeraser.render import resolve_template

    model = load_adapter(base_model, adapter)
    try:
        with fused_attention(model), merged_adapter(model):
            return AdapterEval(model, tok, resolve_template(tok, "auto"), 8, max_length, max_new).generate(records)
    finally:
        unload_adapter(model)


def write_results(folder: Path, name: str, result: dict, table: str) -> None:
    """folder/name.json (the whole result) and folder/name.md (its table), and the table printed."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(result, indent=1))
    (folder / f"{name}.md").write_text(table)
    print(table)
