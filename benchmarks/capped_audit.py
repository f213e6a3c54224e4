"""Which tokens of a removed or replaced value `reset_target` 'capped' pushes, and what two looser rules for "the kept
records predict it" would free; with --answers, what each adapter of the run answers to some prompts and how likely it
finds each token of the record's value (BENCHMARKS.md#forgetting-lost-retained).

    python -m benchmarks.capped_audit WORK/TAG [WORK/TAG ...] [--answers p7-email ...]

Each folder is one scenario's folder of `benchmarks.forgetting --work` (data.jsonl, request.jsonl, original/, and for
--answers retrain/ and llmeraser*/). The rules, beside support.capped_positions (MIN_SEEN 2):
- "seen once": the same counts with MIN_SEEN 1, so a context one kept response shows speaks for retraining;
- "word": the setting capped_words (support.word_completion): a capped token that starts with a small letter, where the
  response so far ends in a small-letter word of two or more letters with the character before it (and at most one
  after it), and every occurrence of that text in the kept responses goes on with the token's text ("x" after "@gm"
  where one kept address is at gmx.net).
Reads and prints only; the model is loaded once, for the tokenizer's rendering and the answers.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from benchmarks import hardware

def audit(folder: Path, mt) -> list[dict]:
    from llmeraser import support
    from llmeraser.data import load_request, records_from_rows
    from llmeraser.modeling import load_adapter, unload_adapter
    from llmeraser.problem import Problem

    tok = mt[1]
    records = records_from_rows([json.loads(line) for line in open(folder / "data.jsonl")])
    model = load_adapter(mt[0], folder / "original")  # Problem needs an adapter's parameters; none is changed
    seen = support.MIN_SEEN
    try:
        pr = Problem(model, tok, records)
        req = load_request(folder / "request.jsonl", records)
        capped = support.capped_positions(pr, req)
        words = support.capped_positions(pr, req, words=True)
        support.MIN_SEEN = 1
        pr._capped.clear()
        once = support.capped_positions(pr, req)
    finally:
        support.MIN_SEEN = seen
        unload_adapter(model)
    out = []
    for e in req.edits:
        if e.id not in capped:
            continue
        x = pr.examples[e.index]
        texts = [tok.decode([i]) for i in x.input_ids[x.n_prompt:]]
        at = sorted(capped[e.id])
        out.append({"id": e.id, "op": e.op, "capped": [texts[k] for k in at],
                    "seen_once_frees": [texts[k] for k in at if k not in once[e.id]],
                    "word_frees": [f"{texts[k]} after {support.WORD_END.search(''.join(texts[:k])).group(0)}"
                                   for k in at if k not in words[e.id]]})
    return out


def answers(folder: Path, mt, ids: list[str]) -> list[dict]:
    """Per adapter and id: the greedy answer and log10 p of each token of the record's value (forgetting.build)."""
    from benchmarks.forgetting import build, evaluator
    from benchmarks.removed_forms import scenario_of
    from llmeraser.data import records_from_rows
    from llmeraser.privacy import part_tokens
    from llmeraser.render import render_text

    values = build(scenario_of(folder.name))[2]
    rows = {r["id"]: r for r in (json.loads(line) for line in open(folder / "data.jsonl"))}
    recs = [records_from_rows([rows[i]])[0] for i in ids]
    out = []
    for path in [folder / "original", folder / "retrain"] + sorted(folder.glob("llmeraser*")):
        with evaluator(mt[0], mt[1], path, 40) as ev:
            got = ev.generate(recs)
            stats = ev.scored(recs, 0, stats=True)[2]
            for i, r, a, s in zip(ids, recs, got, stats, strict=True):
                value = values[i] if isinstance(values[i], str) else values[i][0]
                tail = render_text(ev.tok, *r.sides(), ev.template)[1]
                idx = part_tokens(ev.tok, tail, value) or []
                ids_ = ev.tok(tail, add_special_tokens=False)["input_ids"]
                out.append({"adapter": path.name, "id": i, "answer": a,
                            "value_tokens": [[ev.tok.decode([ids_[k]]), float(s.log_p[k]) / math.log(10)] for k in idx]})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.capped_audit", description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="+", type=Path, help="forgetting-suite scenario folders (of --work)")
    ap.add_argument("--answers", nargs="*", default=[], metavar="ID", help="record ids to answer and score under each adapter")
    hardware.add_args(ap)
    a = ap.parse_args(argv)
    mt = hardware.load("smollm2", a.device, a.dtype)
    for folder in a.folders:
        for r in audit(folder, mt):
            print(f"{folder.name} {r['op']} {r['id']} | capped: {r['capped']} | seen once frees: {r['seen_once_frees']} "
                  f"| word frees: {r['word_frees']}", flush=True)
        for r in answers(folder, mt, a.answers) if a.answers else []:
            cells = " ".join(f"{t!r}:{p:.2f}" for t, p in r["value_tokens"])
            print(f"{folder.name} {r['adapter']} {r['id']} {r['answer']!r} | value tokens, log10 p: {cells}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
