"""Golden results: Δ and key numbers of `Unlearner.delta` on the tiny float64 model, for every edit kind under
every recipe and both main solvers, plus paths the recipes do not reach, recorded before the redesign that split
the Unlearner by stage, so a test can show the maths did not change. Every recorded Δ was computed (or recomputed
and found equal bit for bit) by the pre-redesign code, commit bc0d2f1, from the settings dicts stored with it, but six:
the cases with removals and Newton refinement (memorised remove and mixed, extra/refine_on_a_sample,
extra/hessian_newton) were re-recorded when the refinement's weight decay became m·wd (BENCHMARKS.md#golden-refine-wd).

Regenerate (only when the maths is meant to change, and say why in the commit):
    .venv/bin/python -m tests.golden.cases
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

HERE = Path(__file__).parent
DELTAS, NUMBERS = HERE / "deltas.safetensors", HERE / "numbers.json"
WEIGHT_DECAY = 0.01  # the training L2 enters the damping and, for 'edited', the right-hand side

REQUESTS = {
    "remove": [{"op": "remove", "id": "r1"}, {"op": "remove", "id": "r7"}],
    "modify_query": [{"op": "modify_query", "id": "r2", "new": {"prompt": "phone of Cy, please?"}}],
    "correct_response": [{"op": "correct_response", "id": "r5", "new": {"response": "0420"}}],
    "mixed": [{"op": "remove", "id": "r1"}, {"op": "modify_query", "id": "r2", "new": {"prompt": "phone of Cy, please?"}},
              {"op": "correct_response", "id": "r5", "new": {"response": "0420"}}],
}
RECIPE_NAMES = ("paper", "default", "memorised")
SOLVER_NAMES = ("cg", "stochastic")


def case_settings(recipe_name: str, solver: str) -> dict:
    """The settings of one case as a schema dict: the recipe, on the tiny model, with a short solve."""
    from llmeraser.recipes import recipe

    s = recipe(recipe_name).to_dict()
    s.update(solver=solver, device="cpu", template="chat", batch_size=6)
    if solver != "cg":
        s["damping_grid"] = []
    s["solver_settings"] = {**s["solver_settings"], "tol": 1e-8, "max_iters": 12 if solver == "cg" else 10,
                            "check_every": 5, "power_iters": 2}
    return s


def extra_cases() -> dict:
    """Paths the recipes do not reach on 12 records: the kept anchor, the line search and the refinement on a
    sample of the kept records (the control variate), a line-search sample of its own, Hessian Newton steps."""
    cg = case_settings("default", "cg")
    memorised = case_settings("memorised", "cg")
    return {
        "extra/anchor_kept": {**cg, "curvature": "ggn-base", "anchor_kept": 10.0, "reset_removed": 1.0},
        "extra/control_variate": {**cg, "curvature_samples": 4},
        "extra/line_search_samples": {**cg, "curvature_samples": 4, "line_search_samples": 7},
        "extra/refine_on_a_sample": {**memorised, "curvature_samples": 4},
        "extra/hessian_newton": {**cg, "curvature": "hessian", "damping_grid": [], "damping": 0.5, "newton_steps": 2},
    }


def cases():
    for kind in REQUESTS:
        for r in RECIPE_NAMES:
            for solver in SOLVER_NAMES:
                yield f"{kind}/{r}/{solver}", kind, case_settings(r, solver)
    for name, settings in extra_cases().items():
        yield name, "mixed", settings


def run_case(model, tok, records, kind: str, settings: dict, tmp: Path):
    """(Δ, key numbers) of one case, or (None, {"error": message}) where the maths refuses it."""
    from llmeraser.data import load_request
    from llmeraser.errors import LLMEraserError
    from llmeraser.settings import UnlearnSettings
    from llmeraser.unlearner import Unlearner

    req_path = tmp / f"{kind}.jsonl"
    req_path.write_text("".join(json.dumps(r) + "\n" for r in REQUESTS[kind]))
    req = load_request(req_path, records)
    unl = Unlearner(model, tok, records, UnlearnSettings.from_dict(settings), weight_decay=WEIGHT_DECAY)
    try:
        delta, result, stage = unl.delta(req, progress=False)
    except LLMEraserError as e:
        return None, {"error": type(e).__name__}
    steps = [{"iterations": st["iterations"], "final_residual": st["final_residual"], "converged": st["converged"],
              "scale": (st["line_search"] or {}).get("scale", 1.0)} for st in stage["steps"]]
    return delta, {"rhs_norm": stage["rhs_norm"], "damping_total": unl.damping, "iterations": result.iterations,
                   "final_residual": result.final_residual, "converged": result.converged, "steps": steps,
                   "delta_norm": float(delta.norm())}


def tiny64(root: Path):
    """The tiny float64 PeftModel, tokenizer and records the tests' `tiny64` fixture builds."""
    import sys

    sys.path.insert(0, str(HERE.parent))
    from helpers import load_tiny, make_adapter, make_base, toy_records, write_jsonl
    from llmeraser.data import load_records
    from llmeraser.modeling import load_adapter

    make_base(root / "base")
    model, _ = load_tiny(root / "base")
    make_adapter(model, root / "adapter")
    write_jsonl(root / "train.jsonl", toy_records(12))
    model, tok = load_tiny(root / "base", torch.float64)
    return load_adapter(model, root / "adapter"), tok, load_records(root / "train.jsonl")


def main():
    import tempfile

    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as d:
        model, tok, records = tiny64(Path(d))
        deltas, numbers = {}, {}
        for name, kind, settings in cases():
            delta, nums = run_case(model, tok, records, kind, settings, Path(d))
            numbers[name] = {"settings": settings, **nums}
            if delta is not None:
                deltas[name] = delta.contiguous()
            print(name, nums)
    save_file(deltas, str(DELTAS))
    NUMBERS.write_text(json.dumps(numbers, indent=1) + "\n")


if __name__ == "__main__":
    main()
