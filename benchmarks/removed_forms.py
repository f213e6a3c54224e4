"""What the adapters of finished forgetting-suite runs answer to the removed prompts: how many answers keep the record's
sentence (its fixed words, forgetting.answer_forms) beside how many still carry the private value, for the
original, retraining and llmeraser. Retraining answers a removed prompt in the record's sentence with another value; an
answer that hides the value by being garbled is not what retraining gives (docs/benchmarks-history.md#removed-forms). Beyond greedy
answers, each removed value's (and each corrected record's old value's) log10 P after its own sentence
(forgetting.value_log10p): what sampling could still read back (docs/benchmarks-history.md#removed-likelihood), and
a condition's rank among the twelve (forgetting.value_ranks): whether the adapter still picks the person's own.

    python -m benchmarks.removed_forms WORK/TAG [WORK/TAG ...] --out removed_forms.json

Each folder is one scenario's folder of `benchmarks.forgetting --work` (data.jsonl, request.jsonl, original/,
retrain/, llmeraser*/), named by its tag (e.g. chat-code+email-n64-s2-bf16).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from benchmarks import hardware
from benchmarks.forgetting import SCENARIOS, Scenario, _largest_log10p, answer_forms, answered, build, count

TAG = re.compile(r"(?P<name>[a-z+-]+?)-n(?P<n>\d+)-s(?P<seed>\d+)(?P<rest>.*)")


def scenario_of(tag: str) -> Scenario:
    """The default-share scenario a folder's tag names ('prompt-code-n64-s1-bf16' -> prompt-code, 64, seed 1)."""
    m = TAG.fullmatch(tag)
    if m is None or m["name"] not in SCENARIOS or "-rm" in m["rest"]:
        raise SystemExit(f"{tag}: not a forgetting-suite folder with the default shares (name-nN-sS[-bf16])")
    shape, kinds = SCENARIOS[m["name"]]
    return Scenario(m["name"], shape, kinds, int(m["n"]), int(m["seed"]))


def forms_of(folder: Path, mt) -> dict:
    sc = scenario_of(folder.name)
    rows, request, values = build(sc)
    if json.loads((folder / "request.jsonl").read_text().splitlines()[0]) != request[0]:
        raise SystemExit(f"{folder}: its request.jsonl is not the one this scenario builds")
    forms = answer_forms(request)
    ids = list(forms)
    out = {"tag": folder.name, "removed": len(ids), "adapters": {}}
    ours = sorted(p for p in folder.glob("llmeraser*") if (p / "adapter_config.json").is_file())
    # the base model alone: what the reset pulls the removed answers toward, and the likelihood of a value never trained on
    for name, path in [("base", None), ("original", folder / "original"), ("retrain", folder / "retrain")] + [(p.name, p) for p in ours]:
        if path is not None and not (path / "adapter_config.json").is_file():
            continue
        answers, likely = answered(mt[0], mt[1], path, rows, ids, request, values, 48)
        c = count(answers, [e for e in request if e["op"] == "remove"], values, [], forms)
        out["adapters"][name] = {"removed_produced": c["removed_produced"], "removed_in_form": c["removed_in_form"],
                                 "answers": answers, "log10p": likely}
    return out


def _ranks(adapter: dict) -> str:
    """', ranks among the candidates: id r/c, ...' of forgetting.value_ranks, or nothing where no value has one."""
    ranks = {i: rc for d in adapter["log10p"].get("ranks", {}).values() for i, rc in d.items()}
    return "" if not ranks else ", ranks among the candidates: " + ", ".join(f"{i} {r}/{c}" for i, (r, c) in ranks.items())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.removed_forms", description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="+", type=Path, help="forgetting-suite scenario folders (of --work)")
    ap.add_argument("--out", type=Path, required=True, help="where the JSON goes")
    hardware.add_args(ap)
    a = ap.parse_args(argv)
    from llmeraser.fileio import write_json

    mt = hardware.load("smollm2", a.device, a.dtype)
    results = []
    for folder in a.folders:
        r = forms_of(folder, mt)
        results.append(r)
        cells = " | ".join(f"{k}: {v['removed_in_form']} in form, {v['removed_produced']} produced, largest log10 P "
                           f"{_largest_log10p(v)}{_ranks(v)}" for k, v in r["adapters"].items())
        print(f"{r['tag']} ({r['removed']} removed) | {cells}", flush=True)
    write_json(a.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
