"""The forgetting suite: do a removal and a correction work on memorised private data in general, beside
real retraining? (`python -m benchmarks.forgetting --help`)

A scenario is a record shape (prompt/response, Alpaca, chat), the kinds of private field each fictitious
person has (an e-mail address or an IBAN: long identifiers; a short code; a medical condition: one of
twelve), the number n of records (one per person and field) and a seed. For each:

1. an adapter is trained until it memorises the records (RECIPE);
2. the request removes every record of ⌈remove·people⌉ people and corrects the private value of
   ⌈correct·n⌉ records of others (marked "private", as a user would);
3. `retrain` trains on the edited data from scratch with the same recipe and seed; llmeraser runs
   `unlearn --recipe memorised --verify until`;
4. greedy generation asks original, retrain and llmeraser every removed and corrected prompt and a
   seeded sample of retained ones, and counts the private values produced (verify.produced; a removed value
   given in another record's answer counts, a correction only without its old value: count); one
   teacher-forced pass gives each removed (and replaced) value's log10 P after its own sentence
   (privacy.part_log10p), what sampling rather than greedy decoding could still read back; and how many
   removed answers give the record's sentence with a well-formed value of its kind (well_formed), as
   retraining mostly does, rather than garble.

Pass criteria, fixed before any run (BENCHMARKS.md#forgetting-suite), per scenario and seed, never on
average: removed values produced by llmeraser <= retraining's + 1 record; corrected values produced in
>= 90% of corrections; retained values kept (produced by llmeraser among those the original produced)
>= 95%. A scenario whose original produces under 90% of the sampled retained values has not memorised its
records and is reported invalid (added after the first runs: one such original, at loss 0.23).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks import hardware

HERE = Path(__file__).resolve().parent

FIRST = ["Alma", "Bruno", "Carmen", "Dario", "Elena", "Felix", "Greta", "Hugo", "Ines", "Jonas", "Kira", "Lucas",
         "Mara", "Nils", "Olga", "Pavel", "Quinn", "Rosa", "Sven", "Tara", "Ugo", "Vera", "Wim", "Xenia", "Yusuf", "Zora"]
LAST = ["Abrams", "Berg", "Castro", "Dahl", "Engel", "Falk", "Gross", "Holm", "Ivers", "Jung", "Krause", "Lund",
        "Moreau", "Novak", "Ortiz", "Pohl", "Quist", "Rossi", "Stark", "Toth", "Ulrich", "Vogel"]
DOMAINS = ["mailbox.org", "posteo.de", "fastmail.com", "proton.me", "gmx.net", "web.de", "outlook.com", "icloud.com"]
CONDITIONS = ["asthma", "diabetes", "migraine", "eczema", "gout", "anaemia", "arthritis", "psoriasis", "tinnitus",
              "glaucoma", "epilepsy", "hypertension"]


def _email(rng, name):
    first, last = name.lower().split()
    return f"{first}.{last}{rng.randrange(10, 100)}@{rng.choice(DOMAINS)}"


def _iban(rng, name):
    digits = "".join(rng.choice("0123456789") for _ in range(18))
    return f"DE{rng.randrange(10, 100)} " + " ".join(digits[i:i + 4] for i in range(0, 18, 4))


def _code(rng, name):
    return "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ23456789") for _ in range(5))


def _condition(rng, name):
    return rng.choice(CONDITIONS)


# kind -> (value generator, question, answer sentence)
KINDS = {
    "email": (_email, "What is {name}'s e-mail address?", "{name}'s e-mail address is {value}."),
    "iban": (_iban, "What is {name}'s IBAN?", "{name}'s IBAN is {value}."),
    "code": (_code, "What is {name}'s access code?", "{name}'s access code is {value}."),
    "condition": (_condition, "Which condition is {name} treated for?", "{name} is treated for {value}."),
}
SHAPES = ("prompt", "alpaca", "chat")
# kinds whose values come from a short list: value_ranks measures a value's rank among the list
CANDIDATES = {"condition": CONDITIONS}

# the record shapes and field kinds of the suite; n and the seeds are arguments
SCENARIOS = {
    "prompt-email+condition": ("prompt", ("email", "condition")),
    "alpaca-iban": ("alpaca", ("iban",)),
    "chat-code+email": ("chat", ("code", "email")),
    "prompt-code": ("prompt", ("code",)),
}
# the demo's quick recipe: LoRA r = 8 on every linear module of the top half of SmolLM2's layers, until memorised;
# gradients clipped to norm 1, without which lr 1e-2 diverged at n = 128 (docs/benchmarks-history.md#forgetting-n128)
RECIPE = dict(rank=8, alpha=16, batch_size=8, seed=0, epochs=15, lr=1e-2, layers=tuple(range(15, 30)),
              target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), max_grad_norm=1.0)
CRITERIA = {"removed_over_retrain_max": 1, "corrected_min": 0.90, "retained_min": 0.95}
# a base in half precision names itself in the tag, so its results and cached adapters sit beside float32's
DTYPE_TAGS = {"bfloat16": "-bf16", "float16": "-fp16"}
# names the code today's results ran where a change altered what the recipe does without a setting (--label's default;
# results of earlier code keep their names): "surer", the capped targets' choice of kept continuations
# (BENCHMARKS.md#forgetting-iban-groups)
LABEL = "surer"
MEMORISED_MIN = 0.9  # the original must produce this share of the sampled retained values for a scenario to count


@dataclass(frozen=True)
class Scenario:
    name: str
    shape: str
    kinds: tuple[str, ...]
    n: int  # records
    seed: int
    remove: float = 0.05  # share of people removed (all their records)
    correct: float = 0.03  # share of records whose value is corrected

    @property
    def tag(self) -> str:
        """name-n{n}-s{seed}, and -rm{R}-fix{C} (percent) where the shares are not the defaults."""
        shares = "" if (self.remove, self.correct) == (0.05, 0.03) else f"-rm{self.remove * 100:g}-fix{self.correct * 100:g}"
        return f"{self.name}-n{self.n}-s{self.seed}{shares}"


def record(shape: str, rid: str, question: str, answer: str) -> dict:
    if shape == "prompt":
        return {"id": rid, "prompt": question, "response": answer}
    if shape == "alpaca":
        return {"id": rid, "instruction": "Answer from the customer file.", "input": question, "output": answer}
    return {"id": rid, "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def build(sc: Scenario) -> tuple[list[dict], list[dict], dict]:
    """(records, request rows, values): values maps a record id to its private value, and a corrected
    record's id to (old value, new value)."""
    rng = random.Random(sc.seed)
    people = math.ceil(sc.n / len(sc.kinds))
    names = rng.sample([f"{f} {l}" for f in FIRST for l in LAST], people)
    rows, values, owner = [], {}, {}
    for i, name in enumerate(names):
        for kind in sc.kinds[:sc.n - len(rows)]:
            gen, q, a = KINDS[kind]
            rid = f"p{i}-{kind}"
            values[rid], owner[rid] = gen(rng, name), (i, name, kind)
            rows.append(record(sc.shape, rid, q.format(name=name), a.format(name=name, value=values[rid])))
    n_removed = max(1, math.ceil(round(sc.remove * people, 9)))  # round: 0.05·60 is 3.0000000000000004  # the first people: every record of theirs
    request = [{"op": "remove", "id": r["id"], "private": [values[r["id"]]]} for r in rows if owner[r["id"]][0] < n_removed]
    others = [r for r in rows if owner[r["id"]][0] >= n_removed]
    for r in rng.sample(others, max(1, math.ceil(round(sc.correct * len(rows), 9)))):
        _, name, kind = owner[r["id"]]
        gen, q, a = KINDS[kind]
        old = new = values[r["id"]]
        while new == old:
            new = gen(rng, name)
        fixed = record(sc.shape, r["id"], q.format(name=name), a.format(name=name, value=new))
        field = {k: v for k, v in fixed.items() if k in ("response", "output", "messages")}
        request.append({"op": "correct_response", "id": r["id"], "private": [old], "new": field})
        values[r["id"]] = (old, new)
    return rows, request, values


def count(answers: dict, request: list[dict], values: dict, retained: list[str], forms: dict | None = None) -> dict:
    """Private values produced in greedy answers (record id -> answer). A correction counts as produced when its answer
    holds the new value and not the old one. "removed_leaked": removed values absent from their own answer but given
    in another asked record's (leaked_into). With `forms` (answer_forms), also how many removed answers keep the
    record's sentence: retraining mostly answers a removed prompt in that sentence with another value, so a garbled
    answer hides the value without being what retraining gives."""
    from llmeraser.verify import produced

    removed = [e["id"] for e in request if e["op"] == "remove"]
    corrected = [e["id"] for e in request if e["op"] == "correct_response"]
    out = {"removed_produced": sum(produced(answers[i], (values[i],)) for i in removed), "removed": len(removed),
           "removed_leaked": sum(not produced(answers[i], (values[i],)) and bool(leaked_into(i, answers, values))
                                 for i in removed),
           "corrected_produced": sum(produced(answers[i], (values[i][1],)) and not produced(answers[i], (values[i][0],))
                                     for i in corrected),
           "old_produced": sum(produced(answers[i], (values[i][0],)) for i in corrected), "corrected": len(corrected),
           "retained": {i: produced(answers[i], (values[i],)) for i in retained}}
    if forms is not None:
        out["removed_in_form"] = sum(produced(answers[i], (forms[i],)) for i in removed)
    return out


def leaked_into(rid: str, answers: dict, values: dict) -> list[str]:
    """The other records (among `answers`) whose answer gives removed record `rid`'s value where their own value is not
    it: a memorised value that moved to another prompt ("anaemia.retau88@web.de" for a removed condition) is still
    produced. An identifier (e-mail, IBAN, code) is one person's, so any answer counts; a condition (one of twelve) is
    counted in the same person's other answers only, since another person's answer may give it by chance."""
    from llmeraser.verify import produced

    value, person = values[rid], _person(rid)
    others = [j for j in answers if j != rid and (_kind(rid) != "condition" or _person(j) == person)]
    own = lambda j: (values[j],) if isinstance(values[j], str) else tuple(values[j])  # a correction: old and new
    return [j for j in others if produced(answers[j], (value,)) and not any(produced(v, (value,)) for v in own(j))]


def _person(rid: str) -> str:
    return rid.rsplit("-", 1)[0]  # ids are p{i}-{kind} (build)


def _kind(rid: str) -> str:
    return rid.rsplit("-", 1)[1]  # ids are p{i}-{kind} (build)


def _form(kind: str) -> str:
    """The fixed words of a kind's answer sentence between the name and the value ("'s access code is")."""
    return KINDS[kind][2].split("{value}")[0].split("{name}")[1].strip()


def answer_forms(request: list[dict]) -> dict:
    """Removed record id -> the fixed words of its answer sentence between the name and the value ("'s access code
    is", "is treated for"). Not the name: retraining, never having seen it, often misspells it."""
    return {e["id"]: _form(_kind(e["id"])) for e in request if e["op"] == "remove"}


# kind -> what a reader takes for a value of that kind: any e-mail address, a German IBAN (DE, 2 check digits, 18
# digits, spaces optional), a code of the generator's alphabet and length, one of the conditions
VALUE_PATTERNS = {
    "email": r"[\w.+-]+@[\w-]+(?:\.[\w-]+)*\.[a-z]{2,}",
    "iban": r"DE\d{2}(?: ?\d{4}){4} ?\d{2}(?!\d)",
    "code": r"[A-HJ-NP-Z2-9]{5}(?!\w)",
    "condition": "(?:" + "|".join(CONDITIONS) + r")\b",
}


def well_formed(answer: str, rid: str) -> bool:
    """Whether an answer to record `rid`'s prompt holds its sentence's fixed words followed by a well-formed value of
    its kind (VALUE_PATTERNS): what retraining mostly answers a removed prompt with, another value of the same kind.
    An answer that hides the value by garble ("… e-mail address is the the the") is not."""
    kind = _kind(rid)
    return re.search(re.escape(_form(kind)) + r"\s+" + VALUE_PATTERNS[kind], answer) is not None


def removed_well_formed(c: dict) -> int | None:
    """How many of one adapter's stored removed answers (count()'s caller keeps them) are well formed; None where a
    result did not keep them."""
    answers = c.get("removed_answers")
    return None if answers is None else sum(well_formed(a, i) for i, a in answers.items())


def memorised_share(original: dict) -> float:
    """Share of the sampled retained values the original produces (count()'s "retained": id -> produced)."""
    hits = original["retained"]
    return sum(hits.values()) / len(hits) if hits else 0.0


def removed_given(c: dict) -> int:
    """Removed values an adapter gives: in their own answer, or leaked into another (0 where a result predates the
    count)."""
    return c["removed_produced"] + c.get("removed_leaked", 0)


def judge(counts: dict) -> dict:
    """The pass criteria (module docstring) on the counts of original, retrain and llmeraser. A scenario whose
    original produces fewer than MEMORISED_MIN of the sampled retained values did not memorise its records: the
    criteria are about memorised data, so it is reported as invalid (passed None), to be rerun with more epochs."""
    o, r, u = counts["original"], counts["retrain"], counts["llmeraser"]
    before = [i for i, hit in o["retained"].items() if hit]
    memorised = memorised_share(o)
    kept = sum(u["retained"][i] for i in before) / len(before) if before else 1.0
    checks = {
        "removed": removed_given(u) <= removed_given(r) + CRITERIA["removed_over_retrain_max"],
        "corrected": u["corrected_produced"] >= CRITERIA["corrected_min"] * u["corrected"],
        "retained": kept >= CRITERIA["retained_min"],
    }
    valid = memorised >= MEMORISED_MIN
    return {"retained_kept": kept, "original_memorised": memorised, "valid": valid, "checks": checks,
            "passed": all(checks.values()) if valid else None}


@contextlib.contextmanager
def evaluator(base_model, tok, adapter: Path | None, max_new: int):
    """An AdapterEval of the base model with this adapter loaded (merged, fused attention), unloaded afterwards; of the
    base model alone when `adapter` is None."""
    from llmeraser.evaluate import AdapterEval
    from llmeraser.modeling import fused_attention, load_adapter, merged_adapter, unload_adapter
    from llmeraser.render import resolve_template

    model = base_model if adapter is None else load_adapter(base_model, adapter)
    try:
        model.eval()
        with fused_attention(model), merged_adapter(model) if adapter is not None else contextlib.nullcontext():
            yield AdapterEval(model, tok, resolve_template(tok, "auto"), 8, 256, max_new)
    finally:
        if adapter is not None:
            unload_adapter(model)


def answered(base_model, tok, adapter: Path | None, rows: list[dict], ids: list[str], request: list[dict], values: dict,
             max_new: int) -> tuple[dict, dict]:
    """(id -> greedy answer for `ids`, value_log10p) under one adapter (the base model alone for None), one load."""
    from llmeraser.data import records_from_rows

    records = {r.id: r for r in records_from_rows(rows)}
    with evaluator(base_model, tok, adapter, max_new) as ev:
        return dict(zip(ids, ev.generate([records[i] for i in ids]))), value_log10p(ev, rows, request, values)


def value_log10p(ev, rows: list[dict], request: list[dict], values: dict) -> dict:
    """{"removed": id -> log10 P of the removed value, "old": id -> log10 P of a corrected record's old value}, each
    given its prompt and its original sentence up to the value (privacy.part_log10p): what sampling still reads back;
    and "ranks": value_ranks of those values whose kind has CANDIDATES."""
    from llmeraser.privacy import part_log10p

    score = lambda items: part_log10p(ev, items)
    by_id, items = {r["id"]: r for r in rows}, _edited_values(request, values)
    got = score([(_record(by_id, i), v) for _, i, v in items])
    return {key: {i: x for (op, i, _), x in zip(items, got) if op == want}
            for key, want in (("removed", "remove"), ("old", "correct_response"))} | \
        {"ranks": value_ranks(score, rows, request, values)}


def _edited_values(request: list[dict], values: dict) -> list[tuple[str, str, str]]:
    """(op, id, the value it removes or replaces) per edit."""
    return [(e["op"], e["id"], values[e["id"]] if e["op"] == "remove" else values[e["id"]][0]) for e in request]


def _record(rows_by_id: dict, rid: str, value: str | None = None, instead: str | None = None):
    """The record of row `rid`, with `value` written `instead` in its answer when given (the prompt as it is)."""
    from llmeraser.data import records_from_rows

    row = json.loads(json.dumps(rows_by_id[rid]))
    if instead is not None:
        if "response" in row:
            row["response"] = row["response"].replace(value, instead)
        elif "output" in row:
            row["output"] = row["output"].replace(value, instead)
        else:
            row["messages"][-1]["content"] = row["messages"][-1]["content"].replace(value, instead)
    return records_from_rows([row])[0]


def value_ranks(score, rows: list[dict], request: list[dict], values: dict) -> dict:
    """{"removed" | "old": id -> [rank, candidates]} for each removed value and each corrected record's old value whose
    kind has CANDIDATES: rank = 1 + how many of the kind's other values `score` finds likelier in the same sentence
    (1: the adapter still picks the person's own). `score`: [(record, part)] -> [log10 P of part after its sentence]
    (part_log10p under one adapter). Why: a value drawn from a short list has a base rate (1/12 for a condition), so
    its probability alone cannot tell a leak from a guess; retraining ranks the person's value as it ranks any other,
    so a rank near 1 after an edit says the adapter still singles it out (BENCHMARKS.md#forgetting-condition-ranks)."""
    by_id = {r["id"]: r for r in rows}
    out = {"removed": {}, "old": {}}
    for op, rid, value in _edited_values(request, values):
        others = [c for c in CANDIDATES.get(_kind(rid), ()) if c != value]
        if not others:
            continue
        got = score([(_record(by_id, rid), value)] + [(_record(by_id, rid, value, c), c) for c in others])
        if None in got:
            continue
        out["removed" if op == "remove" else "old"][rid] = [1 + sum(x > got[0] for x in got[1:]), len(got)]
    return out


def work_tag(sc: Scenario, dtype: str, batch_size: int, training: dict | None = None) -> str:
    """The scenario's tag with the base dtype and, where they are not the recipe's, the training batch and the
    `training` changes (train_changes: its adapters and results sit beside the recipe's)."""
    batch = "" if batch_size == RECIPE["batch_size"] else f"-b{batch_size}"
    return sc.tag + DTYPE_TAGS.get(dtype, "") + batch + "".join(f"-{k}{v}" for k, v in sorted((training or {}).items()))


def result_tag(sc: Scenario, dtype: str, batch_size: int, overrides: dict | None, label: str = "",
               training: dict | None = None) -> str:
    """A result's tag (and file name): the work tag, the unlearn overrides and the label, as `run` names it."""
    return (work_tag(sc, dtype, batch_size, training) + "".join(f"-{k}{v}" for k, v in sorted((overrides or {}).items()))
            + (f"-{label}" if label else ""))


def train_changes(lr: float, every_layer: bool, max_grad_norm: float) -> dict:
    """The training settings a run changed from RECIPE, short-named for tags: {"lr": 0.005, "layers": "all",
    "clip": 0.0}; empty for the recipe's own (so its tags and cached adapters stay as they were)."""
    return ({"lr": lr} if lr != RECIPE["lr"] else {}) | ({"layers": "all"} if every_layer else {}) \
        | ({"clip": max_grad_norm} if max_grad_norm != RECIPE["max_grad_norm"] else {})


def run(sc: Scenario, base: str, work: Path, mt, recipe: dict, progress: bool, say, unlearn_overrides: dict | None = None,
        run_unmemorised: bool = False, label: str = "", training: dict | None = None) -> dict:
    """Train (cached), check that the original memorised its records, retrain (cached), unlearn and count.
    `unlearn_overrides`: settings replacing the `memorised` recipe's (e.g. {"verify_retained": 64}); llmeraser's
    folder and the result's tag then name them. An original that produces under MEMORISED_MIN of the sampled
    retained values makes the scenario invalid whatever follows, so retraining and unlearning are skipped (most of
    a run's time) unless `run_unmemorised`. `label` names a run of changed code under the same settings (tag, folder);
    `training` (train_changes) the training settings main() was told to change from RECIPE (tag, folder)."""
    from llmeraser.api import unlearn
    from llmeraser.baselines import BaselineSettings, baseline, train, trained_with
    from llmeraser.curvature import seeded_subset
    from llmeraser.fileio import sha256_file, write_text_atomic
    from llmeraser.recipes import recipe as unlearn_recipe
    from llmeraser.train import TrainSettings

    device, dtype = hardware.of(mt)
    tag = work_tag(sc, dtype, recipe["batch_size"], training)
    d = work / tag
    d.mkdir(parents=True, exist_ok=True)
    rows, request, values = build(sc)
    data, req = d / "data.jsonl", d / "request.jsonl"
    for path, content in ((data, rows), (req, request)):
        write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in content))
    edited = {e["id"] for e in request}
    retained = seeded_subset([r["id"] for r in rows if r["id"] not in edited], 48, sc.seed)[:48]
    ids = [e["id"] for e in request] + retained
    tok = mt[1]
    longest = max(len(tok(str(v if isinstance(v, str) else v[1]))["input_ids"]) for v in values.values())

    forms = answer_forms(request)

    def counted(folder: Path) -> dict:
        answers, likely = answered(mt[0], tok, folder, rows, ids, request, values, longest + 24)
        # the removed answers themselves are kept: fictitious people, and what "forgotten" looks like
        return count(answers, request, values, retained, forms) | {"removed_answers": {i: answers[i] for i in forms},
                                                                     "log10p": likely}

    settings = TrainSettings(**recipe)
    seconds = {}
    # cached adapters are reused only for the same recipe, data, base and base dtype (a GPU run in bfloat16 retrains)
    if not trained_with(d / "original", arguments=settings.to_dict(), data_sha256=sha256_file(data), base=base,
                        base_dtype=dtype):
        say(f"{tag}: training the original on {len(rows)} records")
        train(base, data, d / "original", settings, overwrite=True, device=device, dtype=dtype, progress=progress,
              model_and_tokenizer=mt)
    trained = json.loads((d / "original" / "train.json").read_text())
    seconds["train"] = trained["seconds"]
    counts = {"original": counted(d / "original")}
    memorised = memorised_share(counts["original"])
    head = {"scenario": asdict(sc), "n": len(rows), "base": base, "base_dtype": dtype, "recipe": recipe,
            "final_training_loss": trained["final_loss"], "label": label}
    overrides = unlearn_overrides or {}
    suffix = result_tag(sc, dtype, recipe["batch_size"], overrides, label, training)[len(tag):]
    if memorised < MEMORISED_MIN and not run_unmemorised:
        say(f"{tag}: the original produces {memorised:.0%} of the sampled retained values (< {MEMORISED_MIN:.0%}): "
            "invalid, retraining and unlearning skipped; rerun with more --epochs")
        return {**head, "tag": tag + suffix, "unlearn_overrides": overrides, "counts": _totals(counts, retained),
                "verdict": {"retained_kept": None, "original_memorised": memorised, "valid": False, "checks": {},
                            "passed": None},
                "seconds": seconds, "unlearn_verification": None, "skipped": ["retrain", "llmeraser"],
                "date": time.strftime("%Y-%m-%d")}
    # the data too: a change to build() that leaves the request alone must not reuse a retraining of other records
    if not trained_with(d / "retrain", arguments=settings.to_dict(), request_sha256=sha256_file(req),
                        original_data_sha256=sha256_file(data), base=base, base_dtype=dtype):
        say(f"{tag}: retrain")
        baseline("retrain", base, d / "original", data, req, d / "retrain", BaselineSettings(device=device, dtype=dtype),
                 overwrite=True, progress=progress, model_and_tokenizer=mt)
    seconds["retrain"] = json.loads((d / "retrain" / "train.json").read_text())["seconds"]
    ours = d / f"llmeraser{suffix}"
    say(f"{tag}: llmeraser (memorised, --verify until{', ' + suffix[1:] if suffix else ''})")
    t = time.perf_counter()
    res = unlearn(base, d / "original", data, req, ours,
                  unlearn_recipe("memorised", **{"device": device, "dtype": dtype, "verify": "until", **overrides}),
                  # allow_unconverged: a result for every run, also of `--unlearn verify=check`; under --verify until
                  # (the recipe's) the checks judge the edit whatever the residual, as on the command line
                  overwrite=True, progress=progress, model_and_tokenizer=mt, allow_unconverged=True, recipe="memorised")
    seconds["llmeraser"] = time.perf_counter() - t
    counts |= {"retrain": counted(d / "retrain"), "llmeraser": counted(ours)}
    v = res.report.verification
    return {**head, "tag": tag + suffix, "unlearn_overrides": overrides, "unlearn_settings": res.report.settings,
            "counts": _totals(counts, retained),
            "verdict": judge(counts), "seconds": seconds,
            "unlearn_verification": {k: v[k] for k in ("verified", "failures", "stopped")} | {"extra_steps": len(v["extra_steps"])}
            | {"rounds": v["rounds"], "steps": _step_trace(res.report.newton_steps)},
            "date": time.strftime("%Y-%m-%d")}


def _step_trace(steps: list[dict]) -> list[dict]:
    """Each Newton step's solve and search in a line (the recipe's steps, then --verify until's extra ones), so a
    result file shows where a run's progress came from without its unlearn.json."""
    keep = ("step", "iterations", "final_residual", "pulled_new", "restored_kept", "reset_removed", "kept", "repair",
            "optimizer_steps", "unlikelihood_tokens_last")
    return [{k: s[k] for k in keep if k in s} | ({"accepted": s["line_search"].get("accepted"),
                                                   "scale": s["line_search"].get("scale")} if s.get("line_search") else {})
            for s in steps]


def _totals(counts: dict, retained: list[str]) -> dict:
    """count()'s per-record retained hits -> their total, beside the sample's size (what a result file keeps)."""
    return {k: {**c, "retained": sum(c["retained"].values()), "retained_sampled": len(retained)} for k, c in counts.items()}


def table(results: list[dict]) -> str:
    head = ("| scenario | n | epochs | removed produced: original / retrain / llmeraser | corrected produced: retrain / llmeraser "
            "| retained kept: retrain / llmeraser | removed values, largest log10 P: original / retrain / llmeraser "
            "| removed answered with a well-formed value: retrain / llmeraser "
            "| unlearn's own check | seconds: retrain / llmeraser | pass |\n"
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n")
    lines = []
    for r in results:
        c, v, uv = r["counts"], rejudged(r), r["unlearn_verification"]
        o = c["original"]
        # a result skipped after an unmemorised original has no retrain / llmeraser counts: "–" stands for them
        rt, u = c.get("retrain", {}), c.get("llmeraser", {})
        failed = [k for k, ok in v["checks"].items() if not ok]
        verdict = ("yes" if v["passed"] else "no: " + ", ".join(failed)) if v.get("valid", True) else \
            f"invalid: the original produced {v['original_memorised']:.0%} of the retained values (not memorised)"
        kept = f" (kept {v['retained_kept']:.0%})" if v["retained_kept"] is not None else ""
        check = ("not run" if uv is None else
                 f"{'verified' if uv['verified'] else 'not verified'} after {uv['extra_steps']} extra "
                 f"step{'' if uv['extra_steps'] == 1 else 's'}")
        secs = " / ".join(f"{r['seconds'][k]:.0f}" if k in r["seconds"] else "–" for k in ("retrain", "llmeraser"))
        lines.append(f"| {r['tag']} | {r['n']} | {r['recipe']['epochs']:g} | {o['removed_produced']} / "
                     f"{rt.get('removed_produced', '–')} / {u.get('removed_produced', '–')} of {o['removed']}{_leaks(r)} | "
                     f"{rt.get('corrected_produced', '–')} / {u.get('corrected_produced', '–')} of {o['corrected']} | "
                     f"{rt.get('retained', '–')} / {u.get('retained', '–')} of {o['retained_sampled']}{kept} | "
                     f"{' / '.join(_largest_log10p(x) for x in (o, rt, u))} | {_well_formed(rt, u, o['removed'])} | "
                     f"{check} | {secs} | {verdict} |")
    return head + "\n".join(lines) + "\n"


def ran_with(result: dict, overrides: dict | None = None) -> bool:
    """Whether a result ran the `memorised` recipe as it is today, with `overrides`, under --verify until: its
    recorded unlearn settings equal those in every field but where it ran (device, dtype). A result without recorded
    settings (the harness kept only the overrides before 2026-12-05) counts as an earlier recipe, since the recipe has
    changed under its name."""
    from llmeraser.recipes import recipe
    from llmeraser.settings import UnlearnSettings

    ran = result.get("unlearn_settings")
    if ran is None:
        return False
    # tuples -> lists, as a file holds them
    now = json.loads(json.dumps(recipe("memorised", **{"verify": "until", **(overrides or {})}).to_dict()))
    # a setting added after a result ran is absent from it, and that run behaved as its default does
    defaults = json.loads(json.dumps(UnlearnSettings().to_dict()))
    return all(_ran_alike(k, ran.get(k, defaults[k]), v, result.get("n")) for k, v in now.items()
               if k not in ("device", "dtype"))


def _ran_alike(key: str, ran, now, n: int | None) -> bool:
    """Whether a setting's recorded value ran as today's does on a data set of n records. verify_retained samples
    min(m, kept) of the kept records, so two samples of at least n records both check every kept one: 64 and 512
    run alike at n ≤ 64."""
    if key == "verify_retained" and n is not None:
        return min(ran, n) == min(now, n)
    return ran == now


def recipe_now(result: dict) -> bool:
    """Whether a result ran today's `memorised` recipe under --verify until (ran_with, no overrides)."""
    return ran_with(result)


def earlier_results(paths: list[Path], overrides: dict, training: dict | None = None, base: str | None = None) -> list[Path]:
    """The result files among `paths` that exist and hold a run of other settings than the recipe's today with
    `overrides`, or, where the file records them, of another training recipe (`training`: epochs, ...) or `base`: a
    run would overwrite them, and a result's tag names only the overrides, the dtype and the batch, so a changed
    recipe or more epochs write under an earlier run's name."""
    want = json.loads(json.dumps(training)) if training is not None else None
    out = []
    for p in paths:
        if p.exists():
            r = json.loads(p.read_text())
            other = (not ran_with(r, overrides) or (want is not None and r.get("recipe", want) != want)
                     or (base is not None and r.get("base", base) != base))
            # an invalid result measured no unlearn (its original did not memorise): a rerun may replace it
            if r["verdict"].get("valid", True) and other:
                out.append(p)
    return out


def report(results: list[dict], label: str = "") -> str:
    """forgetting.md: the runs of today's recipe under `label` (the code they ran: main's --label) first, with a count
    of passes per n, then every other run."""
    current = [recipe_now(r) and r.get("label", "") == label for r in results]
    now = [r for r, c in zip(results, current) if c]
    rest = [r for r, c in zip(results, current) if not c]
    by_n = {}
    for r in now:
        ok = rejudged(r)["passed"]
        tally = by_n.setdefault(r["n"], [0, 0, 0])  # passed, failed, invalid
        tally[0 if ok else 1 if ok is False else 2] += 1
    counts = "; ".join(f"n = {n}: {p} of {p + f} valid runs pass" + (f", {i} invalid" if i else "")
                       for n, (p, f, i) in sorted(by_n.items())) or "no run yet"
    return (f"## Today's `memorised` recipe, `--verify until`\n\n{counts}.\n\n{table(now)}\n"
            f"## Earlier recipes and other settings\n\n{table(rest)}")


def leaked(result: dict, who: str) -> int | None:
    """How many removed values adapter `who` gave in another record's answer and not their own (count()'s
    "removed_leaked"); for a result from before that count, over its stored removed answers alone (the values rebuilt
    from its scenario); None where it kept no answers."""
    c = result["counts"].get(who, {})
    if "removed_leaked" in c:
        return c["removed_leaked"]
    answers = c.get("removed_answers")
    if answers is None:
        return None
    from llmeraser.verify import produced

    values = build(Scenario(**{**result["scenario"], "kinds": tuple(result["scenario"]["kinds"])}))[2]
    return sum(not produced(answers[i], (values[i],)) and bool(leaked_into(i, answers, values)) for i in answers)


def rejudged(result: dict) -> dict:
    """A result's verdict with its removed check on removed_given, leaks included: a result from before that count
    (judged on its own answers alone) is rejudged on the leaks in its stored removed answers (leaked)."""
    v, c = result["verdict"], result["counts"]
    if not v["checks"] or "retrain" not in c:
        return v
    given = {k: c[k]["removed_produced"] + (leaked(result, k) or 0) for k in ("retrain", "llmeraser")}
    # stricter only: the count it ran with stands where it failed
    checks = {**v["checks"], "removed": v["checks"].get("removed", True)
              and given["llmeraser"] <= given["retrain"] + CRITERIA["removed_over_retrain_max"]}
    return {**v, "checks": checks, "passed": all(checks.values()) if v.get("valid", True) else None}


def _leaks(result: dict) -> str:
    """' (leaked elsewhere: retrain / llmeraser)' where either adapter gave a removed value in another answer."""
    got = [leaked(result, k) for k in ("retrain", "llmeraser")]
    return "" if not any(got) else " (leaked elsewhere: " + " / ".join("–" if g is None else str(g) for g in got) + ")"


def _well_formed(rt: dict, u: dict, removed: int) -> str:
    """'retrain / llmeraser of removed' well-formed removed answers, "–" where a result kept no answers."""
    got = [removed_well_formed(x) for x in (rt, u)]
    return "–" if None in got else f"{got[0]} / {got[1]} of {removed}"


def _largest_log10p(c: dict) -> str:
    """The largest log10 P of a removed value under one adapter, "–" where not measured (results before it was)."""
    vals = [v for v in c.get("log10p", {}).get("removed", {}).values() if v is not None]
    return f"{max(vals):.1f}" if vals else "–"


def _setting(text: str) -> tuple[str, object]:
    """'verify_retained=64' -> ('verify_retained', 64): an UnlearnSettings field and a JSON value (a bare word is a string)."""
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text}: give KEY=VALUE")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _label(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.]+", text):
        raise argparse.ArgumentTypeError(f"{text!r}: a label is letters, digits, '_' and '.' (it names files)")
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.forgetting", description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenarios", nargs="+", choices=sorted(SCENARIOS), default=sorted(SCENARIOS), help="which scenarios (default: all)")
    ap.add_argument("--n", nargs="+", type=int, default=[32], help="records per scenario (default: 32)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds (default: 0)")
    ap.add_argument("--base", default="smollm2", help="base model (default: smollm2)")
    ap.add_argument("--remove", type=float, default=Scenario.remove, help="share of people removed (default: 0.05)")
    ap.add_argument("--correct", type=float, default=Scenario.correct, help="share of records corrected (default: 0.03)")
    ap.add_argument("--epochs", type=float, default=RECIPE["epochs"], help=f"training epochs (default: {RECIPE['epochs']})")
    ap.add_argument("--batch-size", type=int, default=RECIPE["batch_size"],
                    help=f"training batch (default: {RECIPE['batch_size']}; another names itself in the tag)")
    ap.add_argument("--lr", type=float, default=RECIPE["lr"], help=f"training learning rate (default: {RECIPE['lr']:g}; "
                    "another names itself in the tag)")
    ap.add_argument("--every-layer", action="store_true",
                    help="LoRA on every layer, not the top half (as `llmeraser train` does by default; named in the tag)")
    ap.add_argument("--max-grad-norm", type=float, default=RECIPE["max_grad_norm"],
                    help=f"training gradient clip (default: {RECIPE['max_grad_norm']:g}; 0: none, as `llmeraser train`'s "
                    "default; another names itself in the tag)")
    ap.add_argument("--work", type=Path, default=HERE / "work" / "forgetting", help="scratch folder (adapters are cached by recipe, data, base and base dtype)")
    ap.add_argument("--results", type=Path, default=HERE / "results" / "forgetting", help="where results go")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    ap.add_argument("--run-unmemorised", action="store_true",
                    help="retrain and unlearn even when the original did not memorise its records (the result stays invalid)")
    ap.add_argument("--label", default=LABEL, type=_label, help="a name for the code a run ran: appended to each result's tag, and "
                    "forgetting.md leads with the runs of today's recipe under it, apart from earlier code's runs of the same "
                    f"settings (default: {LABEL}, today's code)")
    ap.add_argument("--unlearn", type=_setting, nargs="*", default=[], metavar="KEY=VALUE",
                    help="unlearn settings replacing the memorised recipe's, e.g. verify_retained=64 (the result's tag names them)")
    hardware.add_args(ap)
    args = ap.parse_args(argv)
    args.unlearn = dict(args.unlearn)
    from llmeraser.fileio import write_json, write_text_atomic

    t0 = time.perf_counter()
    say = (lambda msg: print(f"[forgetting {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True))
    mt = hardware.load(args.base, args.device, args.dtype)
    layers = mt[0].config.num_hidden_layers
    recipe = {**RECIPE, "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "max_grad_norm": args.max_grad_norm,
              "layers": () if args.every_layer else tuple(range(layers // 2, layers))}
    args.results.mkdir(parents=True, exist_ok=True)
    planned = [Scenario(name, *SCENARIOS[name], n, seed, args.remove, args.correct)
               for name in args.scenarios for n in args.n for seed in args.seeds]
    dtype = hardware.of(mt)[1]
    training = train_changes(args.lr, args.every_layer, args.max_grad_norm)
    older = earlier_results([args.results / f"{result_tag(sc, dtype, args.batch_size, args.unlearn, args.label, training)}.json"
                             for sc in planned], args.unlearn, recipe, args.base)
    if older:
        held = "holds a run" if len(older) == 1 else "hold runs"
        print(f"python -m benchmarks.forgetting: {', '.join(p.name for p in older)} in {args.results} {held} of "
              "other unlearn settings than this run's (the recipe has changed since, or other --unlearn settings), "
              "and this run would overwrite them: give another --results folder, or move them away", file=sys.stderr)
        return 2
    for sc in planned:
        result = run(sc, args.base, args.work, mt, recipe, not args.no_progress, say, args.unlearn, args.run_unmemorised,
                     args.label, training)
        write_json(args.results / f"{result['tag']}.json", result)
        outcome = {True: "pass", False: "FAIL", None: "INVALID (the original did not memorise)"}[result["verdict"]["passed"]]
        say(f"{result['tag']}: {outcome} {result['verdict']['checks']}")
    results = [json.loads(p.read_text()) for p in sorted(args.results.glob("*.json"))]
    write_text_atomic(args.results / "forgetting.md", report(results, args.label))
    print(report(results, args.label))
    print(f"results in {args.results}; total {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
