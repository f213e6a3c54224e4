"""The two ways in: `unlearn_model` for objects already in memory (a PeftModel, its tokenizer, records as
dicts, a request as dicts; nothing is written), and `unlearn` for files (what the CLI calls): every input
checked before any model is loaded, then the same path, then the new adapter written atomically.
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from . import distributed
from .acceptance import guard_note
from .data import EditRequest, Record, load_records, load_request, records_from_rows, records_jsonl, request_from_rows
from .errors import InputError, NotConvergedError, NumericalError
from .fileio import atomic_dir, check_output_dir, sha256_file, write_json
from .modeling import (adapter_state, check_adapter, check_base, checkpointed, fused_attention, load_adapter, load_base,
                       resolve_device, resolve_dtype, unload_adapter, write_adapter)
from .recipes import recipe as recipe_settings
from .repair import GradientRepair
from .report import UnlearnReport, peak_memory_mb
from .settings import UnlearnSettings
from .solvers import SolveResult
from .trainrecord import TrainRecord
from .unlearner import Unlearner
from .verify import Verifier, capped_bound_text, missed_by, shortfall, summary_line


@dataclass
class UnlearnResult:
    out: Path | None  # the written adapter folder, None in memory
    delta: torch.Tensor  # ΔΘ, flat, in Θ's order
    solve: SolveResult  # the last solve
    report: UnlearnReport
    state_dict: dict[str, torch.Tensor]  # Θ̂ + ΔΘ keyed as PEFT saves it (set_peft_model_state_dict loads it)

    @property
    def verified(self) -> bool | None:
        """The verification's verdict (verify.py); None when it did not run."""
        v = self.report.verification
        return None if v is None else v["verified"]

    @property
    def meta(self) -> dict:
        """The report as unlearn.json holds it."""
        return self.report.to_dict()


def unlearn_model(model, tokenizer, records: Sequence, request: Sequence | EditRequest, *, weight_decay: float,
                  settings: UnlearnSettings | None = None, recipe: str | None = None, progress: bool = False) -> UnlearnResult:
    """ΔΘ for a PeftModel in memory; nothing is written and the model is not changed.

    Args:
        model: a PeftModel whose adapter tensors are trainable (`PeftModel.from_pretrained(..., is_trainable=True)`).
        records: the training records, any sequence of mappings (a list of dicts, a `datasets.Dataset`).
        request: the edits, a sequence of {op, id, new} mappings.
        weight_decay: the L2 coefficient wd of training ((wd/2)‖Θ‖² in the objective; 0 if none). Required:
            it is part of the curvature, and a silent 0 would be wrong for an adapter trained with one.
        settings: the settings; default: `recipe`'s (default: 'default').
    """
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or not 0 <= weight_decay < float("inf"):
        raise InputError(f"weight_decay {weight_decay!r}: give the training L2 coefficient, a finite number >= 0")
    if settings is None:
        recipe = recipe or "default"
        settings = recipe_settings(recipe)
    records = list(records)  # a generator is read once
    if not (records and all(isinstance(r, Record) for r in records)):
        records = records_from_rows(records)
    req = request if isinstance(request, EditRequest) else request_from_rows(request, records)
    if not any(p.requires_grad for p in model.parameters()):
        raise InputError("the model has no trainable tensors: load the adapter with "
                         "PeftModel.from_pretrained(base, folder, is_trainable=True)")
    # eval mode (no dropout in b or the curvature products) and eager attention (the products differentiate
    # twice, which SDPA does not support), both restored afterwards
    was_training = model.training
    model.eval()
    progress = progress and distributed.is_main()  # with several processes rank 0 alone draws and prints
    try:
        with fused_attention(model, "eager"), checkpointed(model, settings.checkpointing):
            return _unlearn_model(model, tokenizer, records, req, float(weight_decay), settings, recipe, progress)
    finally:
        model.train(was_training)


def _unlearn_model(model, tokenizer, records, req, weight_decay, settings, recipe, progress) -> UnlearnResult:
    unl = Unlearner(model, tokenizer, records, settings, weight_decay=weight_decay)
    p = unl.problem
    if progress:
        print(f"llmeraser: n = {p.n} training samples, {len(req.edits)} edits {req.counts}", file=sys.stderr)
        print(f"llmeraser: {p.params.summary()}", file=sys.stderr)
    delta, result, stage = unl.delta(req, progress)
    theta = p.theta_hat + delta
    if not bool(torch.isfinite(theta).all()):
        raise NumericalError("the update is not finite; nothing was written. Try a larger damping or curvature ggn")
    verification = None
    if settings.verify != "off":
        theta, verification, kept_solve = verify_edit(unl, model, tokenizer, records, req, theta, progress)
        result = kept_solve or result  # the solve of the step whose Θ is written
        stage["steps"] += verification["extra_steps"]
        if stage.get("reset_removed") and verification["kept_after_extra_steps"]:
            stage["reset_removed"]["distance_after_is_before_extra_steps"] = True
        delta = theta - p.theta_hat
    truncated_new = sum(e.truncated for e in p.sets(req).new)
    short = unconverged_steps(stage["steps"], settings)
    report = UnlearnReport(
        recipe=recipe, settings=settings.to_dict(),
        request={"path": req.path, "sha256": req.sha256, "edits": redacted(req.raw)},
        data={"path": None, "sha256": hashlib.sha256(records_jsonl(records).encode("utf-8")).hexdigest()},
        n=p.n, affected=len(req.edits), counts=req.counts, parameters=p.params.numel,
        damping=unl.damping - p.weight_decay, damping_total=unl.damping, training_weight_decay=p.weight_decay,
        template=p.template, truncated_samples=sum(e.truncated for e in p.examples) + truncated_new,
        truncated_new_versions=truncated_new,
        solver={"name": settings.solver, "iterations": result.iterations, "converged": result.converged,
                "final_residual": result.final_residual, "residuals": result.residuals, **result.info},
        rhs_norm=stage["rhs_norm"], newton_steps=stage["steps"], reset_removed=stage.get("reset_removed"),
        delta_norm=float(delta.norm()), theta_norm=float(p.theta_hat.norm()), converged=not short,
        seconds={"b": stage["b"], "solve": stage["solve"],
                 **({"verify": verification["seconds"]} if verification else {})},
        peak_memory_mb=peak_memory_mb(p.device), verification=verification, memory=p.memory.to_dict())
    for st in short if distributed.is_main() else ():
        print(f"llmeraser: warning: in Newton step {st['step']} the solver stopped at residual {st['final_residual']:.3g} "
              f"above tol {settings.solver_settings.tol} after {st['iterations']} iterations", file=sys.stderr)
    for st in negative_curvature_steps(stage["steps"]) if distributed.is_main() else ():
        print(f"llmeraser: warning: in Newton step {st['step']} CG met negative curvature at iteration "
              f"{st['negative_curvature_at']}; the step is its last iterate"
              + (" (steepest descent)" if st["negative_curvature_at"] == 1 else "")
              + ", not a solution: use curvature ggn or a larger damping", file=sys.stderr)
    return UnlearnResult(None, delta, result, report, adapter_state(model, p.params, theta))


def redacted(edits: list[dict]) -> list[dict]:
    """The request's edits as unlearn.json records them: each "private" part by its SHA-256, never its text
    (the new adapter's folder must not carry the data it was made to forget)."""
    import hashlib

    return [{**e, "private": [hashlib.sha256(x.encode("utf-8")).hexdigest() for x in e["private"]]} if e.get("private") else e
            for e in edits]


# an extra step that moves Θ by less than this, relative to ‖Θ̂‖, ends --verify until: the next would not move it either
NO_PROGRESS = 1e-6


def verify_edit(unl: Unlearner, model, tokenizer, records, req, theta, progress: bool):
    """(Θ, the verification, the kept extra step's solve or None): the checks of verify.py at Θ and, with verify
    'until', one more Newton step and check at a time until they pass, a step finds no descent or barely moves
    Θ, or verify_steps or verify_seconds run out. A step pulls the removed records still produced (or likely) toward
    the base model (with verify_reset 'parts', at their private parts only, and corrections' old values too) and
    weights the loss of the new answers not yet produced (by reset_removed's ρ, the latter by verify_pull's when set:
    newton.Refiner.step), and with verify_restore the loss of the kept records whose answers Θ made uncertain
    (Unlearner.uncertain_kept). The Θ returned is the first that passes, else the
    one that missed by the fewest records, then by the fewest capped tokens above verify_capped's bound (verify.missed_by;
    a tie goes to the later), so a step that bought
    forgetting with retained answers is not kept. With verify_repair 'gradient' an extra step is instead a round of
    Adam steps (repair.py), from the original adapter when that misses fewer checks than the update (then it may be
    what is returned). With verify_capped m > 0 a check also fails while any capped token of a removed record (with
    repair_old, of a correction's replaced value too) has p_t > m·τ, with repair_follow m·q*_t
    (repair.GradientRepair.above): the greedy checks can pass with those tokens near 1, and sampling reads the value
    back (BENCHMARKS.md#forgetting-sampling). The extra steps' records are in verification["extra_steps"], each with
    "kept": whether the Θ returned includes it."""
    s, p = unl.settings, unl.problem
    t0 = time.perf_counter()
    if progress:
        print("llmeraser: verifying by greedy generation", file=sys.stderr)
    verifier = Verifier(model, tokenizer, p.params, p.theta_hat, records, req, p.template, s.max_length, s.batch_size,
                        s.verify_retained, s.seed, extractable=s.verify_extractable)
    repair = GradientRepair(p, req, s) if s.verify == "until" and s.verify_repair == "gradient" else None
    capped_check = (repair or GradientRepair(p, req, s)) if s.verify_capped else None

    def checked(theta):
        """verify.py's checks at Θ, and with verify_capped the capped tokens above m·τ (with repair_follow m·q*_t),
        each counted as a failure."""
        c = verifier.check(theta)
        if capped_check is not None:
            above = capped_check.above(theta, s.verify_capped)
            # the bound: a probability, or with repair_follow a multiple of each token's capped target
            c = {**c, "capped_above": above, "capped_bound": s.verify_capped * (1 if s.repair_follow else s.repair_threshold),
                 "capped_per_token": s.repair_follow,
                 "capped_of": "removed or replaced values" if s.repair_old else "removed values"}
            if above:
                c["verified"] = False
                c["failures"] = [*c["failures"], f"{above} capped tokens of {c['capped_of']} above {capped_bound_text(c)} "
                                                 "(sampling could read them back: verify_capped)"]
        return c

    check = checked(theta)
    def round_record(c: dict, steps: int) -> dict:
        out = {"extra_steps": steps, "verified": c["verified"], "failures": c["failures"], "shortfall": shortfall(c)}
        if "capped_above" in c:
            out["capped_above"] = c["capped_above"]
        return {**out, "generated": c.get("generated"), "seconds": time.perf_counter() - t0}

    rounds = [round_record(check, 0)]
    best = (theta, check, 0, None)
    extra, stopped, start = [], None, "update"
    if repair is not None and not check["verified"]:
        # the repair starts from whichever of the update and the original adapter misses fewer checks: where the
        # update lost retained answers, the repair would have to win them back first (BENCHMARKS.md#gradient-repair)
        at_hat = checked(p.theta_hat)
        rounds.append({**round_record(at_hat, 0), "original_adapter": True})
        if missed_by(at_hat) < missed_by(check):
            theta, check, start = p.theta_hat, at_hat, "original"
            best = (theta, check, 0, None)
    while s.verify == "until" and not check["verified"]:
        if len(extra) >= s.verify_steps:
            stopped = f"the budget of {s.verify_steps} extra steps ran out"
        # rank 0's clock decides for every rank, so that all take the same steps
        elif s.verify_seconds and distributed.on_main(lambda: time.perf_counter() - t0 >= s.verify_seconds):
            stopped = f"the budget of {s.verify_seconds:g} s ran out"
        if stopped:
            break
        # with verify_restore: every kept record whose answer this Θ no longer certainly gives (not the sample)
        uncertain = unl.uncertain_kept(req, theta) if s.verify_restore else []
        if repair is not None:
            kept = dict(unl.kept_records(req)) if uncertain else {}
            theta_next, record = repair.round(theta, [kept[i] for i in uncertain])
            solve, record = None, {"step": max(s.newton_steps, 1) + len(extra) + 1, **record}
        else:
            # removed records, and corrections' old values (pulled only with verify_reset 'parts': Unlearner.more_steps),
            # still produced or still likely
            still = [r["id"] for r in check["records"] if r["kind"] in ("removed", "old") and r["checked"]
                     and (r["after"] or r["likely"])]
            missing = [r["id"] for r in check["records"] if r["kind"] in ("new", "query") and r["checked"] and not r["after"]]
            theta_next, solve, record = unl.more_steps(req, theta, progress, reset_ids=still, teach_ids=missing,
                                                       restore_ids=uncertain)
        if s.verify_restore:
            record["uncertain_kept"] = len(uncertain)
        extra.append({**record, "until_verified": True})
        if repair is None and not record["line_search"]["accepted"]:
            stopped = (f"Newton step {record['step']} found no scale that lowered the retraining objective"
                       + guard_note(record["line_search"]))
            break
        moved = float((theta_next - theta).norm()) / max(float(p.theta_hat.norm()), 1e-30)
        theta = theta_next
        check = checked(theta)
        rounds.append(round_record(check, len(extra)))
        if missed_by(check) <= missed_by(best[1]):
            best = (theta, check, len(extra), solve)
        if progress:
            print(f"llmeraser: after extra step {len(extra)}: {summary_line(check)}", file=sys.stderr)
        if not check["verified"] and moved < NO_PROGRESS:
            stopped = f"extra step {len(extra)} moved Θ by {moved:.1g} of ‖Θ̂‖: no progress"
            break
    if unl.refiner is not None:
        unl.refiner.release()
    theta, check, kept, kept_solve = best
    for i, st in enumerate(extra):
        st["kept"] = i < kept
    check = {**check, "rounds": rounds, "extra_steps": extra, "kept_after_extra_steps": kept, "stopped": stopped,
             "until_verified": s.verify == "until", "seconds": time.perf_counter() - t0}
    if repair is not None:
        check["repair_start"] = start
    return theta, check, kept_solve


def unconverged_steps(steps: list[dict], settings: UnlearnSettings) -> list[dict]:
    """The Newton steps whose solve stopped above tol; a step after the first that stops at refine_iters does so
    by design when that is set (its CG iterate still lowers the step's quadratic model, docs/design.md#newton-backtracking),
    and is not one of them, nor is an extra step of verify 'until' (the verification, not the residual, is what it is
    judged by)."""
    return [st for st in steps if not st.get("until_verified") and not st["converged"]
            and (st["step"] == 1 or not settings.refine_iters)]


def judged_by_checks(verification: dict | None) -> bool:
    """Whether the verification, not the solves' residuals, decides that the edit is written: it passed, or it ran
    under --verify until, which writes the adapter either way and gives its verdict as the exit status (0 or
    NOT_VERIFIED_EXIT). Why: the memorised recipe's first CG solve often stops at its cap of 10 above tol 0.05 (on
    every n = 128 run of the forgetting suite, BENCHMARKS.md#unconverged-first-step), while its three Newton steps, each
    backtracked on the objective, and the rounds after them make an edit the checks verify; an unconverged solve
    with no passing check, or none run, still writes nothing (exit 3) unless --allow-unconverged."""
    return verification is not None and bool(verification["verified"] or verification["until_verified"])


def negative_curvature_steps(steps: list[dict]) -> list[dict]:
    """The Newton steps whose CG met pᵀ(C+λI)p ≤ 0 (only the true Hessian can be indefinite): their Δ is CG's last
    iterate before it, a descent direction the line search scaled, not (C+λI)⁻¹b."""
    return [st for st in steps if "negative_curvature_at" in st]


def unlearn(base: str, adapter: str | Path, data: str | Path, request: str | Path, out: str | Path | None,
            settings: UnlearnSettings | None = None, overwrite: bool = False, progress: bool = True,
            model_and_tokenizer=None, allow_other_data: bool = False, allow_unconverged: bool = False,
            recipe: str | None = None) -> UnlearnResult:
    """Apply an edit request to a PEFT adapter folder by the LLMEraser update; write a new adapter.

    Every input is checked before any model is loaded (output place, base, adapter, train.json, data,
    request); nothing is written unless the whole computation succeeds.

    Args:
        base: model folder, .gguf file, or an alias ('smollm2', 'gemma3-270m').
        adapter: the PEFT adapter folder (never modified); its train.json gives the training weight decay.
        data: the training data the adapter was trained on (JSONL or JSON array); checked against the
            SHA-256 and n in the adapter's train.json unless `allow_other_data`.
        request: the edit request (JSONL).
        out: the new adapter folder, written atomically; None computes without writing.
        settings: the settings; default: `recipe`'s (default: 'default').
        model_and_tokenizer: an already loaded (base model, tokenizer) to use instead of `base`.
        allow_unconverged: write the result even when a solve stopped above its tolerance and no check judges the
            edit (judged_by_checks; otherwise NotConvergedError, and nothing is written).
    """
    adapter = Path(adapter)
    inputs = (adapter, data, request, base)
    if out is not None:  # rank 0 alone checks (and clears stale staging folders); the others get its answer
        out = distributed.on_main(lambda: check_output_dir(out, overwrite, inputs=inputs))
    t_start = time.perf_counter()
    if settings is None:
        recipe = recipe or "default"
        settings = recipe_settings(recipe)
    if model_and_tokenizer is None:
        check_base(base)
    check_adapter(adapter)
    record = TrainRecord.read(adapter)
    records = load_records(data)
    req = load_request(request, records)
    data_sha256 = sha256_file(data)
    if record is not None and not allow_other_data:
        record.check_data(data, data_sha256, len(records))
    device = resolve_device(settings.device)
    if model_and_tokenizer is not None:
        base_model, tokenizer = model_and_tokenizer
    else:
        base_model, tokenizer = load_base(base, device, resolve_dtype(settings.dtype, device))
    model = load_adapter(base_model, adapter)
    try:
        t_load = time.perf_counter() - t_start
        res = unlearn_model(model, tokenizer, records, req, weight_decay=record.weight_decay if record else 0.0,
                            settings=settings, recipe=recipe, progress=progress)
        rep = res.report
        rep.request["path"] = str(Path(request).resolve())
        rep.data = {"path": str(Path(data).resolve()), "sha256": data_sha256}
        rep.adapter, rep.base = str(adapter.resolve()), base
        rep.seconds = {"load": t_load, **rep.seconds}
        if not rep.converged and not allow_unconverged and not judged_by_checks(rep.verification):
            st = unconverged_steps(rep.newton_steps, settings)[0]
            raise NotConvergedError(
                f"the solve did not converge (Newton step {st['step']}: residual {st['final_residual']:.3g} > tol "
                f"{settings.solver_settings.tol} after {st['iterations']} iterations), so the update is not the influence "
                f"estimate and nothing was written{' to ' + str(out) if out is not None else ''}. Raise --max-iters or "
                "--damping, pass --verify until to let the verification judge the edit, or pass --allow-unconverged to "
                "write it anyway (unlearn.json then records converged: false)")
        if out is not None:
            def write():
                t0 = time.perf_counter()
                with atomic_dir(out, overwrite, inputs) as tmp:
                    left = write_adapter(res.state_dict, adapter, tmp)
                    if left:  # e.g. a data file kept beside the adapter: the new adapter must not carry what it forgets
                        print(f"llmeraser: not copied from {adapter} (not part of an adapter): {', '.join(left)}",
                              file=sys.stderr)
                    # the new adapter's training record: the recipe's L2 and the edited set's size, so that a later
                    # request on it checks its data by n (the edited data's bytes are the user's to write)
                    if record is not None:
                        write_json(tmp / "train.json", {"arguments": record.arguments, "n": len(records) - rep.counts["remove"],
                                                        "edited_from": str(record.path)})
                    rep.seconds["save"] = time.perf_counter() - t0
                    rep.peak_memory_mb = peak_memory_mb(device)
                    write_json(tmp / "unlearn.json", rep.to_dict())
                return rep.seconds["save"], rep.peak_memory_mb

            # with several processes every rank holds the same ΔΘ; rank 0 writes it while the others wait
            rep.seconds["save"], rep.peak_memory_mb = distributed.on_main(write)
            res.out = out
            if not rep.converged and not allow_unconverged and distributed.is_main():  # judged_by_checks let it through
                print("llmeraser: written although a solve stopped above tol: the verification "
                      f"{'passed' if rep.verification['verified'] else 'ran under --verify until'} and judges the edit "
                      "(unlearn.json records converged: false)", file=sys.stderr)
        return res
    finally:
        unload_adapter(model)  # hand a caller's base model back without the adapter's layers
