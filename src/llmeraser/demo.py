"""`llmeraser demo`: forget and correct private customer records in a LoRA adapter on SmolLM2-135M.

1. make a seeded synthetic data set of fictitious customers (llmeraser.synthetic);
2. fine-tune a LoRA adapter on it until it has memorised them (cached in the output folder);
3. file one request with an edit of each kind: remove every record of some customers, correct
   some phone numbers, strip the account number from some queries;
4. run `unlearn`, `retrain`, `gradient-ascent` and `finetune-corrected`, then `evaluate`;
5. print a short table and what each adapter now answers about a forgotten customer.
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .baselines import BaselineSettings, baseline, train, trained_with
from .evaluate import EvaluateSettings, evaluate
from .errors import InputError
from .fileio import check_output_dir, sha256_file, write_json, write_text_atomic
from .modeling import adapter_weights_path, load_base
from .synthetic import QUESTIONS, make_customers, make_records
from .train import TrainSettings
from .api import unlearn
from .recipes import recipe as unlearn_recipe
from .verify import summary_line

# phone: the private field a removal is about; likes: its query carries the account number (modify_query)
FIELDS = ("phone", "likes")
# the demo table's membership-inference attack: the loss attack, the one every unlearning workbench reports;
# on answers of a few tokens min-k% averages one or two of them (all four are in report.md)
MIA_ATTACK = "loss"


@dataclass
class DemoConfig:
    customers: int
    removed: int
    corrected: int
    modified: int
    epochs: float
    retain_samples: int
    baseline_steps: int
    newton_steps: int
    lr: float = 5e-3
    layers: tuple[int, ...] = ()  # transformer layers the LoRA adapts (empty: all)


# sizes that memorise the customers and the steps the claims need: docs/design.md#demo-sizes
FULL = DemoConfig(customers=12, removed=2, corrected=2, modified=2, epochs=20, retain_samples=0, baseline_steps=10,
                  newton_steps=3, lr=1e-2, layers=tuple(range(15, 30)))
QUICK = DemoConfig(customers=4, removed=1, corrected=1, modified=1, epochs=15, retain_samples=0, baseline_steps=5,
                   newton_steps=4, lr=1e-2, layers=tuple(range(15, 30)))
RECIPE = dict(rank=8, alpha=16, batch_size=8, seed=0,
              target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
# the unlearn settings are the 'memorised' recipe's (recipes.py; docs/recipes.md#memorised)


def build_inputs(cfg: DemoConfig, folder: Path, seed: int = 0):
    """Write data.jsonl and request.jsonl; return (customers, request rows)."""
    customers = make_customers(cfg.customers, seed)
    rows = make_records(customers, FIELDS)
    rng = random.Random(seed + 1)
    req = []
    # "private": what unlearn's verification must no longer see produced (verify.py); a preference, one of
    # ten, is left unmarked: the whole answer is checked
    for i in range(cfg.removed):  # every record of these customers
        req += [{"op": "remove", "id": f"c{i}-{f}", **({"private": [customers[i].phone]} if f == "phone" else {})}
                for f in FIELDS]
    for i in range(cfg.removed, cfg.removed + cfg.corrected):  # a changed phone number
        c = customers[i]
        new_phone = f"555-{(int(c.phone[4:]) + rng.randrange(1, 9999)) % 10000:04d}"
        req.append({"op": "correct_response", "id": f"c{i}-phone", "private": [c.phone],
                    "new": {"response": QUESTIONS["phone"][1].format(name=c.name, phone=new_phone)}})
    start = cfg.removed + cfg.corrected
    for i in range(start, start + cfg.modified):  # the account number leaves the query
        req.append({"op": "modify_query", "id": f"c{i}-likes", "private": [customers[i].account],
                    "new": {"prompt": f"What does {customers[i].name} like?"}})
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in (("data.jsonl", rows), ("request.jsonl", req), ("holdout.jsonl", holdout_records(customers, seed))):
        write_text_atomic(folder / name, "".join(json.dumps(r) + "\n" for r in content))
    return customers, req


def holdout_records(customers, seed: int = 0) -> list[dict]:
    """Records of as many other fictitious customers, never trained on: the non-members that membership
    inference compares the forget set with (same questions, same kinds of values; other names)."""
    taken = {c.name for c in customers}
    others = [c for c in make_customers(2 * len(customers) + 8, seed + 1000) if c.name not in taken][:len(customers)]
    return [{**r, "id": "holdout-" + r["id"]} for r in make_records(others, FIELDS)]


DEMO_MARKER = ".llmeraser-demo"


def claim_folder(out: Path) -> None:
    """Make `out` the demo's folder, refusing one that holds anything else: the demo writes and replaces
    files in it (inputs/, original/, adapters/, report/), which must never be a user's."""
    if out.exists():
        if not out.is_dir():
            raise InputError(f"demo --out {out} is a file; choose a folder")
        legacy = (out / "inputs" / "data.jsonl").is_file() and (out / "original" / "train.json").is_file()
        if any(out.iterdir()) and not (out / DEMO_MARKER).is_file() and not legacy:
            raise InputError(f"demo --out {out} exists and is not a demo folder; choose a new folder (the demo "
                             "writes inputs/, original/, adapters/ and report/ in it)")
    check_output_dir(out / "report", overwrite=True)  # creatable and writable, before any training
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARKER).touch()


def _field_value(record_id: str, customers, response: str | None = None) -> str:
    """The private value a record's answer carries (phone, city or preference)."""
    i, field = record_id[1:].split("-")
    if response is not None and field == "phone":
        return response.rsplit(" ", 1)[-1].rstrip(".")
    return getattr(customers[int(i)], field)


def summarise(report: dict, customers, request_rows) -> dict:
    """Per method: forget NLL, how often private values of removed customers are still produced, etc."""
    removed = {r["id"] for r in request_rows if r["op"] == "remove"}
    corrected = {r["id"]: r["new"]["response"] for r in request_rows if r["op"] == "correct_response"}
    out = {}
    for name, m in report["methods"].items():
        forget = m["forget"]["samples"]
        leaked = [s for s in forget if s["id"] in removed and _field_value(s["id"], customers) in s["generated"]]
        new = m.get("forget_new", {}).get("samples", [])
        fixed = [s for s in new if s["id"] in corrected and _field_value(s["id"], customers, corrected[s["id"]]) in s["generated"]]
        retain = m["retain"]["samples"]
        kept = [s for s in retain if _field_value(s["id"], customers) in s["generated"]]
        # the phone number is private to its customer; a preference is one of ten, and retraining
        # reproduces some by generalising from the kept customers', so the two are also counted apart
        by_field = {f: (sum(s["id"].endswith("-" + f) for s in leaked), sum(s["id"] in removed and s["id"].endswith("-" + f) for s in forget))
                    for f in FIELDS}
        out[name] = {
            "forget_nll": m["forget"]["nll"],
            "removed_field_reproduced": len(leaked) / max(1, sum(s["id"] in removed for s in forget)),
            **{f"removed_{f}_reproduced": k / max(1, total) for f, (k, total) in by_field.items()},
            "corrected_answer_produced": len(fixed) / max(1, len(corrected)),
            "retain_field_accuracy": len(kept) / max(1, len(retain)),
            "retain_nll": m["retain"]["nll"],
            # membership inference by loss, forget records against the held-out customers' (privacy.py)
            "mia_auc": m.get("privacy", {}).get("auc", {}).get(MIA_ATTACK),
            "privacy_leakage": m.get("privacy", {}).get("leakage", {}).get(MIA_ATTACK),
            "seconds": m.get("seconds"),
        }
    return out


def run_demo(out: str | Path = "runs/demo", quick: bool = False, progress: bool = True, base: str = "smollm2",
             config: DemoConfig | None = None) -> dict:
    """Run the demo end to end; `base` and `config` exist so the wiring can be tested on a tiny model."""
    cfg = config or (QUICK if quick else FULL)
    out = Path(out)
    claim_folder(out)
    inputs = out / "inputs"
    t_start = time.perf_counter()
    customers, req_rows = build_inputs(cfg, inputs)
    data, request = inputs / "data.jsonl", inputs / "request.jsonl"
    say = (lambda msg: print(f"[demo {time.perf_counter() - t_start:6.0f}s] {msg}", file=sys.stderr, flush=True))
    say(f"{len(customers)} fictitious customers, {sum(1 for _ in open(data))} records; request: "
        f"remove {cfg.removed} customers, correct {cfg.corrected} phone numbers, strip {cfg.modified} account numbers from queries")
    say("loading SmolLM2-135M-Instruct (embedded)" if base == "smollm2" else f"loading {base}")
    mt = load_base(base, "cpu")
    recipe = TrainSettings(epochs=cfg.epochs, lr=cfg.lr, layers=cfg.layers, **RECIPE)
    original = out / "original"
    # the caches below are keyed by content: a copied or moved demo folder keeps them
    data_sha256, request_sha256 = sha256_file(data), sha256_file(request)
    cached = {"original": trained_with(original, base=base, arguments=recipe.to_dict(), data_sha256=data_sha256)}
    if cached["original"]:
        say(f"original adapter cached in {original}")
    else:
        say("fine-tuning the original LoRA adapter on all records")
        train(base, data, original, recipe, overwrite=True, progress=progress, model_and_tokenizer=mt)
    adapters = {"original": original}
    work = out / "adapters"
    # verify 'until', as the forgetting suite runs it: extra steps until the check passes or the budget runs out
    settings = unlearn_recipe("memorised", newton_steps=cfg.newton_steps, device="cpu", verify="until")
    say("llmeraser unlearn")
    # under --verify until the checks judge the edit, whatever a solve's residual (api.judged_by_checks)
    res = unlearn(base, original, data, request, work / "llmeraser", settings, overwrite=True, progress=progress,
                  model_and_tokenizer=mt, recipe="memorised")
    adapters["llmeraser"], verification = res.out, res.report.verification
    say("llmeraser's own check, " + summary_line(verification))
    retrain = work / "retrain"
    cached["retrain"] = trained_with(retrain, base=base, arguments=recipe.to_dict(), request_sha256=request_sha256,
                                     original_data_sha256=data_sha256)
    if cached["retrain"]:
        say(f"retrained adapter cached in {retrain} (it depends only on the data, the request and the recipe)")
        adapters["retrain"] = retrain
    else:
        say("retrain from scratch on the edited data (the gold standard)")
        adapters["retrain"] = baseline("retrain", base, original, data, request, retrain, overwrite=True,
                                       progress=progress, model_and_tokenizer=mt)
    original_sha256 = sha256_file(adapter_weights_path(original))
    for name in ("gradient-ascent", "finetune-corrected"):
        # like retrain, a function of the original, the data, the request and its steps alone
        cached[name] = trained_with(work / name, "baseline.json", baseline=name, adapter_sha256=original_sha256,
                                    data_sha256=data_sha256, request_sha256=request_sha256, steps=cfg.baseline_steps)
        if cached[name]:
            say(f"{name} adapter cached in {work / name}")
            adapters[name] = work / name
            continue
        say(name)
        adapters[name] = baseline(name, base, original, data, request, work / name, BaselineSettings(steps=cfg.baseline_steps),
                                  overwrite=True, progress=progress, model_and_tokenizer=mt)
    say("evaluate")
    report = evaluate(base, adapters, data, request, out / "report",
                      EvaluateSettings(max_new_tokens=20, retain_samples=cfg.retain_samples, keep_samples=1000),
                      test=inputs / "holdout.jsonl", overwrite=True, progress=progress, model_and_tokenizer=mt,
                      cache_dir=work / ".evaluation")  # a rerun evaluates only adapters whose weights changed
    cached["evaluation"] = sorted(n for n, m in report["methods"].items() if m.get("cached"))
    summary = summarise(report, customers, req_rows)
    verified = {k: verification[k] for k in ("verified", "failures", "removed", "corrected", "queries", "old", "retained")}
    write_json(out / "demo_summary.json", {"summary": summary, "llmeraser_verification": verified, "config": vars(cfg), "quick": quick,
                                                      "seconds_total": time.perf_counter() - t_start, "cached": cached})
    print_summary(summary, report, customers, req_rows)
    print(f"\nfull report: {out / 'report' / 'report.md'} (json and png beside it); total {time.perf_counter() - t_start:.0f}s")
    return summary


def print_summary(summary, report, customers, req_rows):
    print("\n| adapter | forget NLL | removed customers' phone numbers reproduced | their preferences reproduced "
          "| corrected phone produced | retained fields correct | retain NLL | MIA AUC | privacy leakage | seconds |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    num = (lambda x, f: "–" if x is None else format(x, f))  # noqa: E731
    for name, s in summary.items():
        print(f"| {name} | {s['forget_nll']:.3f} | {s['removed_phone_reproduced']:.0%} | {s['removed_likes_reproduced']:.0%} "
              f"| {s['corrected_answer_produced']:.0%} "
              f"| {s['retain_field_accuracy']:.0%} | {s['retain_nll']:.3f} | {num(s.get('mia_auc'), '.2f')} "
              f"| {num(s.get('privacy_leakage'), '+.2f')} | {num(s['seconds'], '.0f')} |")
    print(f"\nMIA AUC: how well the {MIA_ATTACK} attack tells the forget records from held-out customers' records (0.5: not at "
          "all); privacy leakage: (AUC − retrain's) / retrain's, 0 is retraining's. All four attacks: report/report.md.")
    who = customers[0]
    print(f"\nWhat is {who.name}'s phone number? (forgotten customer; the training data said {who.phone})")
    for name, m in report["methods"].items():
        ans = next((s["generated"] for s in m["forget"]["samples"] if s["id"] == "c0-phone"), "?")
        print(f"  {name:>19}: {ans}")

