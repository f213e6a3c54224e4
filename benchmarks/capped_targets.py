"""How well the capped targets' kept continuation distribution K (support.KeptContinuations.distribution) follows the
pattern of the removed values, on the forgetting suite's data, with the tokenizer alone (no training, seconds).

At each capped position t of a removed value (a marked token the kept records do not predict), retraining writes
another value of the same kind, so its next token mostly has the shape (support.shape) of the removed token there:
a digit inside an IBAN's group, a space at its end, a letter after "rosa." in an e-mail. The figure per scenario and
n is the mean over those positions and seeds of

    shape mass = Σ_{y : shape(y) = shape(removed token at t)} K(y),

for K as `distribution` chooses it today and as the token view alone chose it before (with no token context seen, the
shapes'). 1 is every target of the right kind; the rest is mass on tokens that break the value ("DE 392 690 …").
A token of two characters where the removed value has one of the same kind ("FM" for "F") counts as right: shapes
merge lengths (BENCHMARKS.md#forgetting-iban-groups). The second figure counts lengths too:

    well-formed mass = Σ_{y : class(p + text(y)) is a prefix of class(some kept tail)} K(y),

p the removed answer's text from the space before its value up to position t, a kept tail the same span of a kept
answer (its value, the sentence's end, the end-of-turn text), class() support.char_classes (each digit 9, capital A,
other letter a, no runs merged): the mass on continuations that could still end as a kept value ends. It is given for
K as today and with the character view (support.py, `chars` = CHARS; BENCHMARKS.md#forgetting-char-view).

    python -m benchmarks.capped_targets [--n 32 64 128] [--seeds 0 1 2] [--out capped_targets.json]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from benchmarks.forgetting import SCENARIOS, Scenario, build

CHARS = 16  # the character view's longest context, in characters, for the "with chars" figures


def token_first(table, ids: tuple, t: int) -> dict | None:
    """The choice before: the token view's distribution wherever it has seen a context, else the shapes'."""
    d = table.views[0].distribution(ids, t)
    return d if d is not None or len(table.views) < 2 else table.views[1].distribution(ids, t)


def masses(sc: Scenario, tokenizer) -> list[dict]:
    """At every capped position of the scenario's removed values (capped as today): the shape mass today and
    token-first, and the well-formed mass today and with the character view."""
    from llmeraser.data import records_from_rows, request_from_rows
    from llmeraser.privacy import part_positions
    from llmeraser.render import encode, render_text, resolve_template
    from llmeraser.support import KeptContinuations, char_classes

    rows, request_rows, values = build(sc)
    records = records_from_rows(rows)
    request = request_from_rows(request_rows, records)
    template = resolve_template(tokenizer, "auto")
    examples = [encode(r, tokenizer, template, 512) for r in records]
    edited = {e.index for e in request.edits}
    kept = [x for i, x in enumerate(examples) if i not in edited]
    table, chars = KeptContinuations(kept, tokenizer), KeptContinuations(kept, tokenizer, chars=CHARS)

    def tail_from_value(record, value):
        tail = render_text(tokenizer, *record.sides(), template)[1]
        return tail, tail.find(value) - 1  # from the space before the value

    prefixes = set()
    for i, r in enumerate(records):
        if i not in edited:
            tail, at = tail_from_value(r, values[r.id][1] if isinstance(values[r.id], tuple) else values[r.id])
            form = char_classes(tail[at:])
            prefixes.update(form[:k] for k in range(len(form) + 1))
    out = []
    for e in request.edits:
        if e.op != "remove":
            continue
        x, ids = examples[e.index], tuple(examples[e.index].input_ids)
        tail, at = tail_from_value(e.old, e.private[0])
        spans = tokenizer(tail, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        for k in table.unsupported(x, part_positions(tokenizer, template, e.old, e.private)):
            t = x.n_prompt + k
            want, before = table.shape_of(ids[t]), tail[at:max(spans[k][0], at)]

            def shape_mass(d):
                return 0.0 if d is None else sum(p for y, p in d.items() if table.shape_of(y) == want)

            def well_formed(d):
                return 0.0 if d is None else sum(p for y, p in d.items()
                                                 if char_classes(before + tokenizer.decode([y])) in prefixes)
            today, with_chars = table.distribution(ids, t), chars.distribution(ids, t)
            out.append({"shape_mass_token_first": shape_mass(token_first(table, ids, t)),
                        "shape_mass_now": shape_mass(today), "well_formed_now": well_formed(today),
                        "well_formed_chars": well_formed(with_chars)})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", nargs="+", type=int, default=[32, 64, 128], help="records per scenario (default: 32 64 128)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds (default: 0 1 2)")
    ap.add_argument("--base", default="smollm2", help="whose tokenizer (default: smollm2)")
    ap.add_argument("--out", type=Path, help="also write the figures here as JSON")
    args = ap.parse_args(argv)
    from llmeraser.modeling import load_base

    tokenizer = load_base(args.base)[1]
    rows = []
    for name in SCENARIOS:
        for n in args.n:
            got = [m for seed in args.seeds for m in masses(Scenario(name, *SCENARIOS[name], n, seed), tokenizer)]
            row = {"scenario": name, "n": n, "positions": len(got)}
            row |= {key: sum(m[key] for m in got) / len(got) for key in got[0]}
            rows.append(row)
            print(f"{name:24s} n = {n:4d}: {len(got):4d} capped positions, "
                  f"shape mass {row['shape_mass_token_first']:.3f} token-first -> {row['shape_mass_now']:.3f} today; "
                  f"well-formed mass {row['well_formed_now']:.3f} today -> {row['well_formed_chars']:.3f} "
                  f"with chars = {CHARS}", flush=True)
    if args.out:
        from llmeraser.fileio import write_json

        write_json(args.out, {"date": time.strftime("%Y-%m-%d"), "seeds": args.seeds, "chars": CHARS, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
