"""The paper's LLaRA system: query modification on a recommender whose prompts carry projected item vectors.
(`python -m benchmarks.llara --help`)

Built from MovieLens titles in ../shared/data/tallrec-movie (TALLRec's release, read in place):

1. **Catalogue**: every quoted movie title in the file, sorted; an item is its row.
2. **Sequences**: each record's liked list, plus its target when the answer is "Yes." (the user liked it too);
   the last liked item is the next item, the ones before it (at most `history`) the history. Records of one user
   with one liked list give one sequence (duplicates dropped, first kept).
3. **Item vectors**: a GRU4Rec-style recommender (item embedding → GRU → scores against every item embedding,
   cross-entropy of each prefix's next item), pure torch, seeded, trained on the training sequences only; its
   item embedding is the table (`width` columns) the LLM's projector reads.
4. **Prompts** (as LLaRA writes them, each item its title then its slot):
   "This user has watched T1 [[item:i1]], …. Recommend one movie from: C1 [[item:c1]], …. Answer with its title."
   The candidates are the next item and `candidates − 1` others drawn at random, in random order; the answer is
   the next item's title.
5. **QM as in the paper**: a random other item is injected at a random place in 10% of the training
   histories; the request modifies those queries back, so the edited data is the clean data exactly.
   Compared: the corrupted original, retraining on the clean histories, llmeraser, fine-tuning on the corrected
   records. Metrics, on test prompts built the same way from held-out sequences: HitRatio@1 (the greedy answer is
   the next item's title) and the share of valid answers (the answer is one of the candidates' titles).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks import hardware

HERE = Path(__file__).resolve().parent
SEED = 0
NOISE = 0.10  # share of training histories with an injected item (the paper's 10%)


@dataclass(frozen=True)
class Sizes:
    n_train: int
    n_test: int
    candidates: int
    history: int
    width: int = 64  # the item vectors' width (LLaRA's SASRec: 64)
    gru_epochs: int = 30
    epochs: float = 4.0
    lr: float = 3e-3


QUICK = Sizes(n_train=40, n_test=20, candidates=5, history=3, gru_epochs=20, epochs=3.0)
FULL = Sizes(n_train=128, n_test=100, candidates=20, history=5)  # n as the paper suite's scenarios


def load_rows(root: Path) -> list[dict]:
    path = root / "tallrec-movie" / "valid.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the LLaRA scenario reads MovieLens titles from ../shared/data")
    return json.loads(path.read_text())


def titles_in(text: str) -> list[str]:
    return re.findall(r'"([^"]+)"', text)


def catalogue(rows: list[dict]) -> list[str]:
    """Every quoted title in the records, sorted: an item's id is its row here."""
    return sorted({t for r in rows for t in titles_in(r["input"])})


def sequences(rows: list[dict], items: dict[str, int]) -> list[list[int]]:
    """Each record's liked items, with its target appended when the user liked it; duplicates dropped."""
    out, seen = [], set()
    for r in rows:
        liked_line = next((line for line in r["input"].splitlines() if line.startswith("User Preference:")), "")
        seq = [items[t] for t in titles_in(liked_line)]
        target = titles_in(r["input"].splitlines()[-1])
        if r["output"].strip().startswith("Yes") and target:
            seq.append(items[target[0]])
        if len(seq) >= 2 and tuple(seq) not in seen:
            seen.add(tuple(seq))
            out.append(seq)
    return out


def item_vectors(seqs: list[list[int]], n_items: int, width: int, epochs: int, seed: int):
    """GRU4Rec-style next-item model: E ∈ R^{items×width}, h_t = GRU(E[x_≤t]), scores h_t Eᵀ; the mean
    cross-entropy of every prefix's next item. Returns E (the item table) and the final training loss."""
    import torch

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    emb = torch.nn.Embedding(n_items, width)
    gru = torch.nn.GRU(width, width, batch_first=True)
    opt = torch.optim.Adam([*emb.parameters(), *gru.parameters()], lr=1e-2)
    width_seq = max(len(s) for s in seqs)
    x = torch.zeros(len(seqs), width_seq, dtype=torch.long)
    mask = torch.zeros(len(seqs), width_seq - 1, dtype=torch.bool)
    for i, s in enumerate(seqs):
        x[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s) - 1] = True
    loss = torch.tensor(float("nan"))
    for _ in range(epochs):
        for idx in torch.randperm(len(seqs), generator=g).split(64):
            h, _ = gru(emb(x[idx, :-1]))
            scores = h @ emb.weight.T
            m = mask[idx]
            loss = torch.nn.functional.cross_entropy(scores[m], x[idx, 1:][m])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return emb.weight.detach().clone(), float(loss.detach())


def prompt(history: list[int], candidates: list[int], names: list[str]) -> str:
    said = ", ".join(f"{names[i]} [[item:{i}]]" for i in history)
    offered = ", ".join(f"{names[i]} [[item:{i}]]" for i in candidates)
    return f"This user has watched {said}. Recommend one movie from: {offered}. Answer with its title."


def examples(seqs: list[list[int]], names: list[str], sizes: Sizes, rng: random.Random, tag: str) -> list[dict]:
    """One record per sequence: its history, its candidates (the next item and random others) and the answer."""
    out = []
    for k, seq in enumerate(seqs):
        history, nxt = seq[:-1][-sizes.history:], seq[-1]
        others = rng.sample([i for i in range(len(names)) if i != nxt and i not in history], sizes.candidates - 1)
        cands = others + [nxt]
        rng.shuffle(cands)
        out.append({"id": f"{tag}{k}", "prompt": prompt(history, cands, names), "response": names[nxt],
                    "history": history, "candidates": cands, "next": nxt})
    return out


def corrupt(train: list[dict], names: list[str], rng: random.Random) -> tuple[list[dict], list[dict]]:
    """(training rows with an item injected into ⌈10%⌉ of the histories, the request that modifies them back)."""
    chosen = sorted(rng.sample(range(len(train)), max(1, -(-len(train) * int(NOISE * 100) // 100))))
    rows, request = [dict(r) for r in train], []
    for k in chosen:
        r = rows[k]
        noise = rng.choice([i for i in range(len(names)) if i not in r["history"] and i not in r["candidates"]])
        noisy = list(r["history"])
        noisy.insert(rng.randrange(len(noisy) + 1), noise)
        rows[k] = {**r, "prompt": prompt(noisy, r["candidates"], names), "history": noisy, "injected": noise}
        request.append({"op": "modify_query", "id": r["id"], "new": {"prompt": r["prompt"]}})
    return rows, request


def records_only(rows: list[dict]) -> list[dict]:
    """The rows as training records (id, prompt, response); the other keys are the benchmark's bookkeeping."""
    return [{"id": r["id"], "prompt": r["prompt"], "response": r["response"]} for r in rows]


def hit_ratio(answers: list[str], rows: list[dict], names: list[str]) -> dict:
    """HitRatio@1 (the answer is the next item's title) and the share of valid answers (a candidate's title)."""
    def norm(s):
        return " ".join(s.strip().strip(".").split()).lower()

    hits = [norm(a) == norm(names[r["next"]]) for a, r in zip(answers, rows)]
    valid = sum(norm(a) in {norm(names[c]) for c in r["candidates"]} for a, r in zip(answers, rows))
    return {"hit_ratio_at_1": sum(hits) / len(rows), "valid": valid / len(rows), "n": len(rows), "hits": hits}


def build(root: Path, sizes: Sizes, seed: int = SEED) -> dict:
    """Everything the scenario trains and tests on, seeded: catalogue, splits, item table, rows and request."""
    rows = load_rows(root)
    names = catalogue(rows)
    seqs = sequences(rows, {t: i for i, t in enumerate(names)})
    rng = random.Random(seed)
    rng.shuffle(seqs)
    if len(seqs) < sizes.n_train + sizes.n_test:
        raise ValueError(f"only {len(seqs)} distinct sequences; ask for fewer than {sizes.n_train} + {sizes.n_test}")
    train_seqs, test_seqs = seqs[:sizes.n_train], seqs[sizes.n_train:sizes.n_train + sizes.n_test]
    table, gru_loss = item_vectors(train_seqs, len(names), sizes.width, sizes.gru_epochs, seed)
    clean = examples(train_seqs, names, sizes, rng, "u")
    test = examples(test_seqs, names, sizes, rng, "t")
    noisy, request = corrupt(clean, names, rng)
    return {"names": names, "table": table, "gru_loss": gru_loss, "clean": clean, "noisy": noisy, "request": request,
            "test": test}


def run(sizes: Sizes, base: str, work: Path, mt, data_root: Path, progress: bool, say, recipe: dict | None = None) -> dict:
    """Train the corrupted original and the clean retraining, apply the request with llmeraser and with
    fine-tuning on the corrected records, and measure each on the test prompts and on the corrected records."""
    from safetensors.torch import save_file

    from benchmarks.edit_methods import METHODS, generate, seconds, solver_summary, train_and_edit
    from llmeraser.data import records_from_rows
    from llmeraser.fileio import write_text_atomic
    from llmeraser.metrics import paired_bootstrap
    from llmeraser.train import TrainSettings

    work.mkdir(parents=True, exist_ok=True)
    b = build(data_root, sizes)
    save_file({"embeddings": b["table"]}, str(work / "items.safetensors"))
    data, req = work / "train.jsonl", work / "request.jsonl"
    write_text_atomic(data, "".join(json.dumps(r) + "\n" for r in records_only(b["noisy"])))
    write_text_atomic(req, "".join(json.dumps(r) + "\n" for r in b["request"]))
    settings = TrainSettings(**(recipe or {"rank": 8, "alpha": 16, "target_modules": ("q_proj", "v_proj"),
                                           "epochs": sizes.epochs, "lr": sizes.lr, "batch_size": 8, "max_length": 1024}))
    rep, peaks = train_and_edit(base, work, data, req, settings, mt, progress, say,
                                f"{len(b['noisy'])} histories ({len(b['request'])} with an injected item)",
                                item_table=work / "items.safetensors")
    tok = mt[1]
    max_new = max(len(tok(n)["input_ids"]) for n in b["names"]) + 2
    edited = {e["id"] for e in b["request"]}
    corrected = [r for r in b["clean"] if r["id"] in edited]
    metrics = {}
    for name in METHODS:
        say(f"evaluate {name}")
        metrics[name] = {split: hit_ratio(generate(mt[0], tok, work / name, records_from_rows(records_only(rows)), max_new, 1024),
                                          rows, b["names"]) for split, rows in (("test", b["test"]), ("corrected", corrected))}
    ours, theirs = metrics["llmeraser"]["test"]["hits"], metrics["retrain"]["test"]["hits"]
    diff = paired_bootstrap(lambda idx: sum(ours[i] - theirs[i] for i in idx) / len(idx), len(ours))
    return {"sizes": asdict(sizes), "base": base, "seed": SEED, "items": len(b["names"]), "gru_final_loss": b["gru_loss"],
            "n_train": len(b["noisy"]), "edits": len(b["request"]), "n_test": len(b["test"]), "metrics": metrics,
            "llmeraser_minus_retrain_hit_ratio": {"point": diff[0], "low": diff[1], "high": diff[2]},
            "seconds": seconds(work, rep), "peak_mb": peaks, "llmeraser": solver_summary(rep), "date": time.strftime("%Y-%m-%d")}


def table(result: dict) -> str:
    m = result["metrics"]
    lines = ["| adapter | HitRatio@1 (test) | valid answers (test) | HitRatio@1 (corrected histories) | seconds | peak MiB |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name in ("original", "retrain", "llmeraser", "finetune-corrected"):  # edit_methods.METHODS
        secs, peak = result["seconds"].get(name), result.get("peak_mb", {}).get(name)
        lines.append(f"| {name} | {m[name]['test']['hit_ratio_at_1']:.3f} | {m[name]['test']['valid']:.3f} | "
                     f"{m[name]['corrected']['hit_ratio_at_1']:.3f} | {secs:.0f} | {'' if peak is None else f'{peak:,.0f}'} |")
    d = result["llmeraser_minus_retrain_hit_ratio"]
    return ("\n".join(lines) + f"\n\nllmeraser − retrain, test HitRatio@1: {d['point']:+.3f} (95% paired bootstrap "
            f"{d['low']:+.3f} to {d['high']:+.3f})\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.llara", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"the CI size ({QUICK.n_train} histories, {QUICK.candidates} candidates)")
    ap.add_argument("--base", default="smollm2", help="base model (default: smollm2)")
    ap.add_argument("--data-root", type=Path, default=HERE.parent.parent / "shared" / "data", help="where tallrec-movie/ is")
    ap.add_argument("--work", type=Path, default=HERE / "work" / "llara", help="scratch folder (adapters cached by recipe and data)")
    ap.add_argument("--results", type=Path, default=HERE / "results" / "llara", help="where the results go")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    hardware.add_args(ap)
    args = ap.parse_args(argv)

    sizes = QUICK if args.quick else FULL
    tag = "quick" if args.quick else "full"
    if not (args.data_root / "tallrec-movie" / "valid.json").is_file():
        print(f"{args.data_root}/tallrec-movie/valid.json not found; give --data-root", file=sys.stderr)
        return 2
    mt = hardware.load(args.base, args.device, args.dtype)
    result = run(sizes, args.base, args.work / f"{args.base}-{tag}", mt, args.data_root, not args.no_progress,
                 lambda msg: print(f"[llara {time.strftime('%H:%M:%S')}] {msg}", flush=True))
    from benchmarks.edit_methods import write_results

    write_results(args.results, f"{args.base}-{tag}", result, table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
