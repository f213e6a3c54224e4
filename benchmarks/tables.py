"""Markdown tables (and the scaling plot) from benchmarks/results/*.json."""

from __future__ import annotations

import json
from pathlib import Path

ORDER = ("IR", "QM", "RC", "RC-gen")


def _f(x, digits=3):
    if x is None:
        return "–"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def fidelity(r: dict) -> list[str]:
    m = r["metrics"]
    gen = r["scenario"] == "RC-gen"
    cols = [("test", "rouge1"), ("test", "rouge2"), ("test", "rougeL")] if gen else [("test", "auc"), ("test", "accuracy")]
    if r["scenario"] == "IR":
        cols.append(("forget", "auc"))
    cols += [("retain", "rougeL" if gen else "auc"), ("forget", "nll")]
    lines = [f"| {r['scenario']} | " + " | ".join(f"{s} {k}" for s, k in cols) + " | KL to retrain (test) |",
             "| --- " * (len(cols) + 2) + "|"]
    for name, x in m.items():
        vals = [x.get(s, {}).get(k) for s, k in cols]
        lines.append(f"| {name} | " + " | ".join(_f(v) for v in vals) + f" | {_f(x.get('vs_retrain', {}).get('kl_test'), 4)} |")
    if r["scenario"] in ("QM", "RC", "RC-gen"):
        key = ("test", "rougeL") if gen else ("test", "auc")
        orig, ret = m["original"][key[0]][key[1]], m["retrain"][key[0]][key[1]]
        for name in m:
            if name.startswith("llmeraser") and ret != orig:
                share = (m[name][key[0]][key[1]] - orig) / (ret - orig)
                lines.append(f"\n{name} recovers {share:.0%} of the {key[0]} {key[1]} gap between the corrupted original and retrain "
                             f"({orig:.3f} → {ret:.3f}).")
    return lines


def cost(r: dict) -> list[str]:
    h = r["hvp_cost"]
    lines = [f"| {r['scenario']} solver | b s | solve s | save s | total s | retrain s | retrain / llmeraser | iterations | final rel. residual | line-search scale | peak MB (unlearn) | peak MB (training step) |",
             "| --- " * 12 + "|"]
    for solver, c in r["llmeraser"].items():
        s = c["seconds"]
        lines.append(f"| {solver} | {s['b']:.1f} | {s['solve']:.1f} | {s.get('save', 0):.1f} | {c['seconds_total']:.1f} | {r['retrain_seconds']:.0f} "
                     f"| {c['speedup_vs_retrain']:.1f}× | {c['solver_iterations']} | {c['final_relative_residual']:.3f} | {_f(c['line_search_scale'])} "
                     f"| {c['peak_mb']:.0f} | {r['training_peak_mb']:.0f} |")
    vjp = ""
    if "ggn_double_vjp_s" in h:  # results before the forward-mode GGN product have only the double-vjp one
        vjp = (f"; by the double-vjp trick {h['ggn_double_vjp_s']:.2f} s ({h['ggn_double_vjp_over_gradient']:.2f}×, "
               f"peak {h['ggn_double_vjp_peak_mb']:.0f} MB)")
    lines.append(f"\nOne batch of {h['batch_size']} ({h['tokens']} tokens): gradient {h['gradient_s']:.2f} s; fresh GGN product "
                 f"({h.get('ggn_mode', 'rev_rev')}) {h['ggn_s']:.2f} s ({h['ggn_over_gradient']:.2f}×){vjp}; with the kept linearisation "
                 f"{h['ggn_cached_s']:.2f} s ({h['ggn_cached_over_gradient']:.2f}×); "
                 f"Hessian by double backprop {h['hessian_rev_rev_s']:.2f} s ({h['hessian_rev_rev_over_gradient']:.2f}×). "
                 f"Peak memory added: gradient {h['gradient_peak_mb']:.0f} MB, fresh GGN product {h['ggn_peak_mb']:.0f} MB.")
    return lines


def scaling(r: dict, folder: Path) -> list[str]:
    lines = ["| n | edits | llmeraser (cg) s | retrain s | retrain / llmeraser |", "| --- | --- | --- | --- | --- |"]
    for p in r["points"]:
        lines.append(f"| {p['n']} | {p['edits']} | {p['seconds_total']:.1f} | {p['retrain_seconds']:.0f} | {p['speedup_vs_retrain']:.1f}× |")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ns = [p["n"] for p in r["points"]]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(ns, [p["retrain_seconds"] for p in r["points"]], "o-", label="retrain")
        ax.plot(ns, [p["seconds_total"] for p in r["points"]], "s-", label="llmeraser (cg)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("training samples n")
        ax.set_ylabel("seconds")
        ax.set_title("IR 5%, tallrec-book, SmolLM2-135M LoRA")
        ax.legend()
        fig.tight_layout()
        fig.savefig(folder / "scaling.png", dpi=120)
        plt.close(fig)
        lines.append("\n![seconds against n](scaling.png)")
    except ImportError:
        pass
    return lines


def render(folder: Path) -> str:
    out = []
    for name in ORDER:
        p = folder / f"{name}.json"
        if p.is_file():
            r = json.loads(p.read_text())
            out += [f"### {name} (n = {r['n']}, {r['edits']} edits, test {r['test']}; {r['date']})", ""] + fidelity(r) + [""] + cost(r) + [""]
    p = folder / "scaling.json"
    if p.is_file():
        r = json.loads(p.read_text())
        out += [f"### scaling ({r['date']})", ""] + scaling(r, folder) + [""]
    return "\n".join(out)
