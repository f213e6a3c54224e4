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
merge lengths (BENCHMARKS.md#forgetting-iban-groups).

    python -m benchmarks.capped_targets [--n 32 64 128] [--seeds 0 1 2] [--out capped_targets.json]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

from benchmarks.forgetting import SCENARIOS, Scenario, build


def token_first(table, ids: tuple, t: int) -> dict | None:
    """The choice before: the token view's distribution wherever it has seen a context, else the shapes'."""
    d = table.views[0].distribution(ids, t)
    return d if d is not None or len(table.views) < 2 else table.views[1].distribution(ids, t)


def shape_masses(sc: Scenario, tokenizer) -> list[tuple[float, float]]:
    """(shape mass today, shape mass token-first) at every capped position of the scenario's removed values."""
    from llmeraser.data import records_from_rows, request_from_rows
    from llmeraser.privacy import part_positions
    from llmeraser.render import encode, resolve_template
    from llmeraser.support import KeptContinuations

    rows, request_rows, _ = build(sc)
    records = records_from_rows(rows)
    request = request_from_rows(request_rows, records)
    template = resolve_template(tokenizer, "auto")
    examples = [encode(r, tokenizer, template, 512) for r in records]
    edited = {e.index for e in request.edits}
    table = KeptContinuations([x for i, x in enumerate(examples) if i not in edited], tokenizer)
    out = []
    for e in request.edits:
        if e.op != "remove":
            continue
        x, ids = examples[e.index], tuple(examples[e.index].input_ids)
        for k in table.unsupported(x, part_positions(tokenizer, template, e.old, e.private)):
            t = x.n_prompt + k
            want = table.shape_of(ids[t])
            mass = [0.0 if d is None else sum(p for y, p in d.items() if table.shape_of(y) == want)
                    for d in (table.distribution(ids, t), token_first(table, ids, t))]
            out.append(tuple(mass))
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
            got = defaultdict(list)
            for seed in args.seeds:
                for now, before in shape_masses(Scenario(name, *SCENARIOS[name], n, seed), tokenizer):
                    got["now"].append(now)
                    got["before"].append(before)
            k = len(got["now"])
            rows.append({"scenario": name, "n": n, "positions": k, "shape_mass_now": sum(got["now"]) / k,
                         "shape_mass_token_first": sum(got["before"]) / k})
            print(f"{name:24s} n = {n:4d}: {k:4d} capped positions, shape mass {rows[-1]['shape_mass_token_first']:.3f} "
                  f"token-first -> {rows[-1]['shape_mass_now']:.3f} today")
    if args.out:
        from llmeraser.fileio import write_json

        write_json(args.out, {"date": time.strftime("%Y-%m-%d"), "seeds": args.seeds, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
