"""Benchmarks entry point.

    python -m benchmarks.run --suite paper [--quick] [--scenarios IR QM RC RC-gen scaling]

Reads ../shared/data (beside the checkout; --data-root to point elsewhere) and exits with a clear
message when it is absent. Full runs write benchmarks/results/<scenario>.json and
benchmarks/results/paper.md (the tables for BENCHMARKS.md) and scaling.png; --quick runs every
scenario at a tiny size and writes under benchmarks/work/quick/ so it never replaces full results.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data"


def epochs(text: str) -> float:
    e = float(text)
    if not e > 0:
        raise argparse.ArgumentTypeError(f"{text}: give a positive number of epochs")
    return e


def size(text: str) -> int:
    n = int(text)
    if n < 2:
        raise argparse.ArgumentTypeError(f"{n}: a training set needs at least 2 samples (one to remove, one to keep)")
    return n


def parse(argv=None):
    from .paper import SCENARIOS

    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=("paper",), default="paper", help="which benchmark suite (only 'paper' so far)")
    ap.add_argument("--quick", action="store_true", help="every scenario at a tiny size (a smoke run, minutes; numbers mean nothing)")
    ap.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS), help="which scenarios to run (default: all)")
    ap.add_argument("--scaling-n", nargs="+", type=size, default=None, metavar="N",
                    help="training-set sizes for the scaling scenario (default: the suite's; the points of an earlier run "
                         "with the same recipe and sizes are kept, so large n can be measured one at a time)")
    ap.add_argument("--epochs", type=epochs, default=None,
                    help="training epochs for every adapter (default: the suite's 4, a recipe that memorises; the paper "
                         "trains fewer). Another value gets its own --work and --results folders, work/paper/epochsE and "
                         "results/epochsE, so the suite's results and cached adapters stay as they are")
    ap.add_argument("--data-root", type=Path, default=DEFAULT_DATA, help=f"folder with tallrec-book/, tallrec-movie/, dialogsum/ (default: {DEFAULT_DATA})")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder for adapters and splits (default: benchmarks/work/paper or work/quick)")
    ap.add_argument("--results", type=Path, default=None, help="where result files go (default: benchmarks/results, or work/quick/results with --quick)")
    ap.add_argument("--base", choices=("smollm2", "gemma3-270m"), default="smollm2",
                    help="model family (default: smollm2). Another base gets its own --work and --results folders, "
                         "work/paper/BASE and results/BASE; LoRA goes on the top half of its layers")
    ap.add_argument("--solvers", nargs="+", choices=("cg", "stochastic"), default=["cg", "stochastic"],
                    help="llmeraser's solvers to run (default: both)")
    ap.add_argument("--n-train", type=size, default=None,
                    help="training samples of the IR, QM and RC scenarios (default: the suite's); another value gets its "
                         "own folders, work/paper/nN and results/nN")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    return ap.parse_args(argv)


def missing_data(root: Path, scenarios) -> list[str]:
    need = {"IR": "tallrec-book/valid.json", "RC": "tallrec-book/valid.json", "scaling": "tallrec-book/valid.json",
            "QM": "tallrec-movie/valid.json", "RC-gen": "dialogsum/dev.jsonl"}
    return sorted({need[s] for s in scenarios if not (root / need[s]).is_file()})


def record_run(path: Path, run: dict) -> None:
    """Append this run to run.json's list: a later run of some scenarios must not erase what the others cost."""
    from llmeraser.fileio import write_json

    runs = []
    if path.is_file():
        old = json.loads(path.read_text())
        runs = old["runs"] if "runs" in old else [old]  # the first format held one run
    write_json(path, {"runs": runs + [run]})


def plan(args, sizes):
    """(sizes, work folder, results folder) for these flags. A recipe other than the suite's (--epochs) gets
    folders of its own: the cached adapters are reused by recipe, and results/ holds the suite's own run."""
    if args.scaling_n:
        sizes = replace(sizes, scaling_n=tuple(args.scaling_n))
    tags = [] if getattr(args, "base", "smollm2") == "smollm2" else [args.base]
    if args.epochs is not None and args.epochs != sizes.epochs:
        sizes = replace(sizes, epochs=args.epochs)
        tags.append(f"epochs{args.epochs:g}")
    if getattr(args, "n_train", None) and args.n_train != sizes.n_train:
        sizes = replace(sizes, n_train=args.n_train)
        tags.append(f"n{args.n_train}")
    tag = "-".join(tags)
    work = args.work or HERE / "work" / ("quick" if args.quick else "paper") / tag
    if args.results:
        results = args.results
    else:
        results = work / "results" if args.quick else HERE / "results" / tag
    return sizes, work, results


def main(argv=None) -> int:
    args = parse(argv)
    missing = missing_data(args.data_root, args.scenarios)
    if missing:
        print(f"benchmarks: skipped: {', '.join(missing)} not found under {args.data_root}; these benchmarks read the "
              "shared data sets beside the checkout (give --data-root FOLDER if they are elsewhere)", file=sys.stderr)
        return 2
    from llmeraser.modeling import load_base

    from .paper import FULL, QUICK, Runner
    from .tables import render

    sizes, work, results = plan(args, QUICK if args.quick else FULL)
    results.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    mt = load_base(args.base, "cpu")
    runner = Runner(args.data_root.resolve(), work, results, sizes, mt, progress=not args.no_progress, base=args.base,
                    solvers=tuple(args.solvers))
    timings = {}
    for name in args.scenarios:
        t = time.perf_counter()
        runner.scenario(name)
        timings[name] = time.perf_counter() - t
        runner.say(f"{name} done in {timings[name]:.0f}s")
    (results / "paper.md").write_text(render(results))
    record_run(results / "run.json", {"quick": args.quick, "base": args.base, "scenarios": args.scenarios, "scaling_n": list(sizes.scaling_n),
                                      "seconds": timings, "seconds_total": time.perf_counter() - t0, "date": time.strftime("%Y-%m-%d")})
    print(render(results))
    print(f"results in {results}; total {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
