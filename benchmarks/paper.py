"""The paper's protocol (../shared/docs/method.md §5) on real public data, at this machine's scale.

Scenarios (issue 6):
  IR       tallrec-book   remove 5% of the training samples                 test AUC, forget-set AUC
  QM       tallrec-movie  10% of histories get a random other movie injected into "User Preference";
                          the adapter trained on them is corrected back to the clean histories
  RC       tallrec-book   30% of training labels flipped; corrected back      test AUC
  RC-gen   dialogsum      20% of summaries replaced by another dialogue's; corrected back   ROUGE-1/2/L
  scaling  tallrec-book   IR 5% at several n                                  seconds of unlearn vs retrain

For QM / RC / RC-gen the "original" adapter is the one trained on the corrupted data (the paper's
Corrupted) and retrain is trained on the clean data. Every split and edit comes from a fixed seed.
"""

from __future__ import annotations

import json
import random
import re
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from llmeraser.baselines import BaselineSettings, baseline, train, trained_with
from llmeraser.evaluate import EvaluateSettings, evaluate
from llmeraser.fileio import sha256_file, write_json
from llmeraser.modeling import load_adapter, unload_adapter
from llmeraser.solvers import SolverSettings
from llmeraser.train import TrainSettings
from llmeraser.api import unlearn
from llmeraser.recipes import recipe
from llmeraser.settings import UnlearnSettings

from .costs import PeakMemory, hvp_cost

SCENARIOS = ("IR", "QM", "RC", "RC-gen", "scaling")
SUMMARY_PROMPT = "Summarise the following dialogue in one or two sentences.\n\n{dialogue}"


@dataclass
class Sizes:
    n_train: int
    n_test: int
    n_gen_train: int  # dialogsum
    n_gen_test: int
    epochs: float
    max_length: int
    retain_eval: int
    cg_iters: int
    stochastic_iters: int
    curvature_samples: int
    max_new_tokens: int
    scaling_n: tuple[int, ...]
    baseline_steps: int


# One training step on a batch of 8 TALLRec prompts of ~160 tokens takes ~8 s on the 2-core CPU machine
# (measured). Chat-rendered TALLRec prompts: median 210 tokens, 95th percentile 313 (book); DialogSum
# median 268, so 320 cuts some dialogues on the left. The full sizes here are what fits in a session there, far below the paper's.
# RC-gen is scored on 256 test dialogues: with 16, the 95% paired interval of llmeraser − retrain ROUGE-L was about
# ±3.7 points, too wide to judge a 1-point target (BENCHMARKS.md, sixteenth session).
FULL = Sizes(n_train=128, n_test=96, n_gen_train=48, n_gen_test=256, epochs=4, max_length=320, retain_eval=32,
             cg_iters=8, stochastic_iters=16, curvature_samples=16, max_new_tokens=40,
             scaling_n=(32, 64, 128), baseline_steps=8)
QUICK = Sizes(n_train=8, n_test=4, n_gen_train=6, n_gen_test=2, epochs=1, max_length=64, retain_eval=2,
              cg_iters=2, stochastic_iters=2, curvature_samples=4, max_new_tokens=4,
              scaling_n=(8, 16), baseline_steps=1)
# LoRA on every linear module of the top half (layers 15-29 of 30): measured on tallrec-book at n = 128 it
# memorises its training set in 4 epochs (train AUC 0.979), where q/v on every layer at lr 1e-3 learned
# nothing (AUC 0.45) and left nothing to unlearn; adapting only the top layers also halves every backward
# pass (BENCHMARKS.md, "TALLRec-book on the CPU with a memorising recipe").
RECIPE = dict(rank=8, alpha=16, lr=3e-3, batch_size=8, seed=0, layers=tuple(range(15, 30)),
              target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
SEED = 0


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def load_tallrec(root: Path, name: str) -> list[dict]:
    return json.loads((root / name / "valid.json").read_text())


def load_dialogsum(root: Path) -> list[dict]:
    rows = [json.loads(line) for line in (root / "dialogsum" / "dev.jsonl").read_text().splitlines() if line.strip()]
    return [{"prompt": SUMMARY_PROMPT.format(dialogue=r["dialogue"]), "response": r["summary"]} for r in rows]


def split(rows: list[dict], n_train: int, n_test: int, seed: int = SEED) -> tuple[list[dict], list[dict]]:
    """Seeded, disjoint train and test samples; every record gets a stable id ("s<position in the file>")."""
    if n_train + n_test > len(rows):
        raise ValueError(f"asked for {n_train} + {n_test} samples from a file of {len(rows)}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    tagged = [{"id": f"s{i}", **rows[i]} for i in order[:n_train + n_test]]
    return tagged[:n_train], tagged[n_train:]


def pick(n: int, fraction: float, seed: int) -> list[int]:
    """A seeded choice of round(fraction·n) (at least 1) positions."""
    return sorted(random.Random(seed).sample(range(n), max(1, round(fraction * n))))


def inject_movie(text: str, pool: list[str], rng: random.Random) -> str:
    """Insert a random other movie at a random place in the 'User Preference:' list."""
    head, sep, rest = text.partition("User Preference: ")
    line, nl, tail = rest.partition("\n")
    items = [x for x in re.findall(r'"[^"]*"', line)]
    movie = rng.choice([m for m in pool if m not in items])
    items.insert(rng.randrange(len(items) + 1), movie)
    return head + sep + ", ".join(items) + nl + tail


# each builder returns (training rows as trained on, clean training rows, request rows)
def build_ir(train_rows, seed):
    return train_rows, None, [{"op": "remove", "id": train_rows[i]["id"]} for i in pick(len(train_rows), 0.05, seed)]


def build_qm(train_rows, seed, pool):
    rng = random.Random(seed)
    corrupted, req = [dict(r) for r in train_rows], []
    for i in pick(len(train_rows), 0.10, seed):
        corrupted[i]["input"] = inject_movie(train_rows[i]["input"], pool, rng)
        req.append({"op": "modify_query", "id": train_rows[i]["id"], "new": {"input": train_rows[i]["input"]}})
    return corrupted, train_rows, req


def build_rc(train_rows, seed):
    corrupted, req = [dict(r) for r in train_rows], []
    for i in pick(len(train_rows), 0.30, seed):
        corrupted[i]["output"] = "No." if train_rows[i]["output"] == "Yes." else "Yes."
        req.append({"op": "correct_response", "id": train_rows[i]["id"], "new": {"output": train_rows[i]["output"]}})
    return corrupted, train_rows, req


def build_rc_gen(train_rows, seed):
    rng = random.Random(seed)
    corrupted, req = [dict(r) for r in train_rows], []
    for i in pick(len(train_rows), 0.20, seed):
        j = rng.choice([k for k in range(len(train_rows)) if k != i])
        corrupted[i]["response"] = train_rows[j]["response"]
        req.append({"op": "correct_response", "id": train_rows[i]["id"], "new": {"response": train_rows[i]["response"]}})
    return corrupted, train_rows, req


def adapter_distance(a: Path, b: Path) -> float:
    """‖Θ_a − Θ_b‖ / ‖Θ_b‖ over two saved adapters' weights."""
    from llmeraser.evaluate import _flat
    from llmeraser.metrics import relative_distance
    from llmeraser.modeling import adapter_weights_path, read_adapter_file

    return relative_distance(*(_flat(read_adapter_file(adapter_weights_path(x))) for x in (a, b)))


def is_quick(sizes: Sizes) -> bool:
    """The smoke sizes, whatever scaling_n was given (--scaling-n replaces it)."""
    return replace(sizes, scaling_n=QUICK.scaling_n) == QUICK


def llmeraser_settings(sizes: Sizes, solver: str) -> UnlearnSettings:
    """The 'default' recipe at the benchmark's sizes (the stochastic solver has no shifted form: no λ grid)."""
    iters = sizes.cg_iters if solver == "cg" else sizes.stochastic_iters
    overrides = {} if solver == "cg" else {"damping_grid": ()}
    return recipe("default", solver=solver, curvature_samples=sizes.curvature_samples, max_length=sizes.max_length,
                  device="cpu", solver_settings=SolverSettings(tol=0.05, max_iters=iters, check_every=max(2, iters // 4),
                                                               power_iters=2 if is_quick(sizes) else 4), **overrides)


def recipe_for(model) -> dict:
    """RECIPE with LoRA on the top half of this model's decoder layers (SmolLM2: 15-29 of 30; Gemma 3 270M: 9-17 of 18)."""
    if model is None:  # no model loaded (tests of the bookkeeping): SmolLM2's
        return RECIPE
    layers = model.config.num_hidden_layers
    return {**RECIPE, "layers": tuple(range(layers // 2, layers))}


class Runner:
    def __init__(self, data_root: Path, work: Path, results: Path, sizes: Sizes, mt, progress: bool = True,
                 base: str = "smollm2", solvers: tuple[str, ...] = ("cg", "stochastic")):
        self.root, self.work, self.results, self.sizes, self.mt, self.progress = data_root, work, results, sizes, mt, progress
        self.base, self.solvers = base, solvers
        self.recipe = TrainSettings(epochs=sizes.epochs, max_length=sizes.max_length, **recipe_for(mt[0] if mt else None))

    def say(self, msg):
        print(f"[paper {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def train(self, data: Path, out: Path) -> Path:
        """Train the original adapter, or reuse it when a finished run of this recipe on this data is there."""
        if trained_with(out, arguments=self.recipe.to_dict(), data_sha256=sha256_file(data)):
            self.say(f"reusing {out} (same recipe and data)")
            return out
        train(self.base, data, out, self.recipe, overwrite=True, progress=self.progress, model_and_tokenizer=self.mt)
        return out

    def retrain(self, original: Path, data: Path, request: Path, out: Path) -> Path:
        if trained_with(out, arguments=self.recipe.to_dict(), request_sha256=sha256_file(request),
                        original_data=str(data.resolve())):
            self.say(f"reusing {out} (same recipe, data and request)")
            return out
        return baseline("retrain", self.base, original, data, request, out, overwrite=True, progress=self.progress,
                        model_and_tokenizer=self.mt)

    def edit(self, name: str, trained_rows, clean_rows, req_rows, test_rows, cheap: str) -> dict:
        """Train the original (or corrupted) adapter and retrain, apply the edit with llmeraser (cg and
        stochastic) and the cheap baseline, evaluate everything, write results/<name>.json."""
        s, d = self.sizes, self.work / name
        data = write_jsonl(d / "train.jsonl", trained_rows)
        request = write_jsonl(d / "request.jsonl", req_rows)
        test = write_jsonl(d / "test.jsonl", test_rows)
        if clean_rows is not None:  # the request must turn the corrupted data back into the clean data exactly
            from llmeraser.data import apply_request, load_records, load_request

            records = load_records(data)
            fixed = [r.fields for r in apply_request(records, load_request(request, records))]
            assert fixed == clean_rows, f"{name}: the request does not restore the clean training data"
        self.say(f"{name}: n = {len(trained_rows)}, {len(req_rows)} edits, test {len(test_rows)}; training the original")
        original = self.train(data, d / "original")
        probe = self.probe_for(name, original, trained_rows)
        train_peak = probe["gradient_peak_mb"]  # a training step: forward and backward of one batch
        adapters = {"original": original}
        self.say(f"{name}: retrain")
        adapters["retrain"] = self.retrain(original, data, request, d / "retrain")
        runs = {}
        for solver in self.solvers:
            self.say(f"{name}: llmeraser ({solver})")
            with PeakMemory() as mem:
                res = unlearn(self.base, original, data, request, d / f"llmeraser-{solver}", llmeraser_settings(s, solver),
                              overwrite=True, progress=self.progress, model_and_tokenizer=self.mt, allow_unconverged=True)
            runs[solver] = {**res.meta, "stage_peak_mb": mem.peak_mb}
            adapters[f"llmeraser-{solver}"] = res.out
        if name == "IR" and "cg" in self.solvers and "stochastic" in self.solvers:  # the memory-lean setting: the same maths, so only its cost and its distance to cg are recorded
            self.say(f"{name}: llmeraser (cg, --cache-batches 0)")
            lean = replace(llmeraser_settings(s, "cg"), cache_batches=0)
            with PeakMemory() as mem:
                res = unlearn(self.base, original, data, request, d / "llmeraser-cg-lean", lean,
                              overwrite=True, progress=self.progress, model_and_tokenizer=self.mt, allow_unconverged=True)
            runs["cg, --cache-batches 0"] = {**res.meta, "stage_peak_mb": mem.peak_mb,
                                             "relative_distance_to_cg": adapter_distance(res.out, adapters["llmeraser-cg"])}
        self.say(f"{name}: {cheap}")
        adapters[cheap] = baseline(cheap, self.base, original, data, request, d / cheap, BaselineSettings(steps=s.baseline_steps),
                                   overwrite=True, progress=self.progress, model_and_tokenizer=self.mt)
        self.say(f"{name}: evaluate")
        metrics = self.metrics(adapters, data, request, test, d / "report", s.max_new_tokens if name == "RC-gen" else 4)
        retrain_s = json.loads((adapters["retrain"] / "train.json").read_text())["seconds"]
        result = {
            "scenario": name, "base": self.base, "sizes": asdict(s), "recipe": self.recipe.to_dict(), "seed": SEED,
            "n": len(trained_rows), "edits": len(req_rows), "test": len(test_rows),
            "metrics": metrics,
            "llmeraser": {solver: self.cost_row(meta, retrain_s, train_peak) for solver, meta in runs.items()},
            "retrain_seconds": retrain_s, "training_peak_mb": train_peak, "hvp_cost": probe,
            "date": time.strftime("%Y-%m-%d"),
        }
        write_json(self.results / f"{name}.json", result)
        return result

    def metrics(self, adapters: dict, data: Path, request: Path, test: Path, out: Path, max_new: int) -> dict:
        """Each adapter's metrics on the forget, corrected, retained (a sample) and test sets."""
        s = self.sizes
        report = evaluate(self.base, adapters, data, request, out,
                          EvaluateSettings(max_new_tokens=max_new, max_length=s.max_length, retain_samples=s.retain_eval,
                                           keep_samples=3),
                          test=test, overwrite=True, progress=self.progress, model_and_tokenizer=self.mt)
        metrics = {m: {k: v for k, v in r.items() if k in ("forget", "forget_new", "retain", "test", "vs_retrain", "privacy")}
                   for m, r in report["methods"].items()}
        for m in metrics.values():  # generated samples make the file long and say little here
            for split in m.values():
                if isinstance(split, dict):
                    split.pop("samples", None)
        return metrics

    @staticmethod
    def cost_row(meta: dict, retrain_s: float, train_peak: float) -> dict:
        secs = meta["seconds"]
        total = secs["b"] + secs["solve"] + secs.get("save", 0.0)
        v = meta.get("verification") or {}
        return {"seconds": {k: secs[k] for k in ("b", "solve", "save") if k in secs}, "seconds_total": total,
                # unlearn's own generation check, outside the total (it is not part of the update)
                "verify_seconds": secs.get("verify"), "verified": v.get("verified"),
                "speedup_vs_retrain": retrain_s / total, "solver_iterations": meta["solver"]["iterations"],
                "final_relative_residual": meta["solver"]["final_residual"], "converged": meta["solver"]["converged"],
                "hvps": meta["solver"].get("hvps"),
                # CG's fixed batches whose linearisation stayed in memory: each saves ~3 s per iteration at n = 2048
                "kept_linearisations": meta["solver"].get("kept_linearisations"), "line_search_scale": (meta["newton_steps"][0].get("line_search") or {}).get("scale"),
                "damping": meta.get("damping", meta["settings"]["damping"]),
                "damping_selection": meta["newton_steps"][0].get("damping_selection"),
                "solver_settings": meta["settings"]["solver_settings"],
                "peak_mb": meta["stage_peak_mb"], "peak_over_training": meta["stage_peak_mb"] / train_peak if train_peak > 0 else None,
                **({"relative_distance_to_cg": meta["relative_distance_to_cg"]} if "relative_distance_to_cg" in meta else {})}

    def probe_for(self, name: str, original: Path, rows) -> dict:
        """The HVP cost probe; RC reuses IR's (the same tallrec-book samples at the same sizes: ~5 min saved)."""
        twin = self.results / "IR.json"
        if name == "RC" and twin.is_file():
            ir = json.loads(twin.read_text())
            if self.same_sizes(ir["sizes"]):
                self.say("RC: the same samples as IR: reusing its HVP cost probe")
                return {**ir["hvp_cost"], "measured_in": "IR"}
        self.say(f"{name}: HVP cost probe")
        return self.probe(original, rows)

    def probe(self, adapter: Path, rows, products: bool = True) -> dict:
        from llmeraser.data import load_records

        model = load_adapter(self.mt[0], adapter)
        try:
            records = load_records(write_jsonl(self.work / "probe.jsonl", rows[:8]))
            # one timed call after a warm-up: at full size each product takes 10-40 s on the CPU machine
            return hvp_cost(model, self.mt[1], records, max_length=self.sizes.max_length, repeats=1,
                            warm_up=not is_quick(self.sizes), products=products)
        finally:
            unload_adapter(model)

    def scenario(self, name: str) -> dict:
        s = self.sizes
        if name == "IR":
            tr, te = split(load_tallrec(self.root, "tallrec-book"), s.n_train, s.n_test)
            rows, _, req = build_ir(tr, SEED)
            return self.edit(name, rows, None, req, te, "gradient-ascent")
        if name == "QM":
            all_rows = load_tallrec(self.root, "tallrec-movie")
            pool = sorted({m for r in all_rows for m in re.findall(r'"[^"]*"', r["input"])})
            tr, te = split(all_rows, s.n_train, s.n_test)
            rows, clean, req = build_qm(tr, SEED, pool)
            return self.edit(name, rows, clean, req, te, "finetune-corrected")
        if name == "RC":
            tr, te = split(load_tallrec(self.root, "tallrec-book"), s.n_train, s.n_test)
            rows, clean, req = build_rc(tr, SEED)
            return self.edit(name, rows, clean, req, te, "finetune-corrected")
        if name == "RC-gen":
            tr, te = split(load_dialogsum(self.root), s.n_gen_train, s.n_gen_test)
            rows, clean, req = build_rc_gen(tr, SEED)
            return self.edit(name, rows, clean, req, te, "finetune-corrected")
        if name == "scaling":
            return self.scaling()
        raise ValueError(f"unknown scenario {name!r}; choose from {SCENARIOS}")

    def same_sizes(self, recorded: dict) -> bool:
        """Recorded sizes equal these, aside from those that do not change the reused runs (IR's, the scaling
        points'): scaling_n, and n_gen_test, which only picks RC-gen's test dialogues."""
        now = asdict(self.sizes)
        return all(recorded.get(k) == v for k, v in now.items() if k not in ("scaling_n", "n_gen_test"))

    def ir_run(self, data: Path, request: Path) -> dict | None:
        """results/IR.json when it was run on exactly this data and request at these sizes."""
        ir, d = self.results / "IR.json", self.work / "IR"
        if not (ir.is_file() and (d / "train.jsonl").is_file() and (d / "request.jsonl").is_file()):
            return None
        r = json.loads(ir.read_text())
        same = (sha256_file(d / "train.jsonl") == sha256_file(data) and sha256_file(d / "request.jsonl") == sha256_file(request)
                and self.same_sizes(r["sizes"]))
        return r if same else None

    def unlearn_record(self) -> dict:
        """The scaling points' `unlearn` settings, as they read back from JSON."""
        return json.loads(json.dumps(llmeraser_settings(self.sizes, "cg").to_dict()))

    def recorded_points(self) -> list[dict]:
        """The points of results/scaling.json when it was run with this recipe at these sizes: a run for some
        n (--scaling-n) adds to them, so the largest points, hours each on a CPU, can be measured in separate runs.
        Each point's retrain and llmeraser seconds come from one run on one machine, and carry its date."""
        p = self.results / "scaling.json"
        if not p.is_file():
            return []
        r = json.loads(p.read_text())
        if r.get("recipe") != self.recipe.to_dict() or not self.same_sizes(r["sizes"]) or r.get("unlearn") != self.unlearn_record():
            return []  # a point measured with other unlearn settings (e.g. before --damping-grid) is not kept
        return [{"date": r["date"], **pt} for pt in r["points"]]

    def scaling(self) -> dict:
        """IR 5% at each n: seconds of llmeraser (cg) against retraining, same recipe and machine."""
        book = load_tallrec(self.root, "tallrec-book")
        points = []
        kept = self.recorded_points()
        for n in self.sizes.scaling_n:
            d = self.work / "scaling" / f"n{n}"
            # the train rows are the same for any test size (split takes them first); larger n gets a larger test set
            tr, te = split(book, n, min(len(book) - n, max(self.sizes.n_test, n // 8)))
            rows, _, req_rows = build_ir(tr, SEED)
            data, request = write_jsonl(d / "train.jsonl", rows), write_jsonl(d / "request.jsonl", req_rows)
            same = self.ir_run(data, request)
            if same:  # n = n_train is the IR scenario's own data and request: its run is this point
                self.say(f"scaling: n = {n}: the IR scenario's run")
                points.append({"n": n, "edits": len(req_rows), "retrain_seconds": same["retrain_seconds"],
                               **same["llmeraser"]["cg"], "measured_in": "IR", "date": same["date"]})
                continue
            self.say(f"scaling: n = {n}: original")
            original = self.train(data, d / "original")
            train_peak = self.probe(original, rows, products=False)["gradient_peak_mb"]
            self.say(f"scaling: n = {n}: llmeraser (cg)")
            with PeakMemory() as mem:
                res = unlearn(self.base, original, data, request, d / "llmeraser-cg", llmeraser_settings(self.sizes, "cg"),
                              overwrite=True, progress=self.progress, model_and_tokenizer=self.mt, allow_unconverged=True)
            self.say(f"scaling: n = {n}: retrain")
            retrain = self.retrain(original, data, request, d / "retrain")
            retrain_s = json.loads((retrain / "train.json").read_text())["seconds"]
            self.say(f"scaling: n = {n}: evaluate ({len(te)} test samples)")
            metrics = self.metrics({"original": original, "retrain": retrain, "llmeraser-cg": res.out}, data, request,
                                   write_jsonl(d / "test.jsonl", te), d / "report", max_new=4)
            points.append({"n": n, "edits": len(req_rows), "retrain_seconds": retrain_s,
                           **self.cost_row({**res.meta, "stage_peak_mb": mem.peak_mb}, retrain_s, train_peak),
                           "test": len(te), "metrics": metrics, "date": time.strftime("%Y-%m-%d")})
        run = {p["n"] for p in points}
        points = sorted(points + [p for p in kept if p["n"] not in run], key=lambda p: p["n"])
        sizes = {**asdict(self.sizes), "scaling_n": [p["n"] for p in points]}
        result = {"scenario": "scaling", "sizes": sizes, "recipe": self.recipe.to_dict(), "seed": SEED,
                  "unlearn": self.unlearn_record(), "points": points, "date": time.strftime("%Y-%m-%d")}
        write_json(self.results / "scaling.json", result)
        return result
