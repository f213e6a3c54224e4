"""PNG plots for an evaluation report (matplotlib, no display needed)."""

from __future__ import annotations

import json
from pathlib import Path


def plot_report(report: dict, adapters: dict[str, Path], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    methods = list(report["methods"])
    panels = []
    first = report["methods"][methods[0]]
    for split in ("forget", "forget_new", "retain", "test"):
        for key in ("nll", "auc", "rougeL", "exact_match"):
            if key in first.get(split, {}):
                panels.append((split, key))
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2), squeeze=False)
        for ax, (split, key) in zip(axes[0], panels):
            vals = [report["methods"][m].get(split, {}).get(key, float("nan")) for m in methods]
            ax.bar(range(len(methods)), vals, color=[f"C{i}" for i in range(len(methods))])
            ax.set_xticks(range(len(methods)), methods, rotation=45, ha="right", fontsize=8)
            ax.set_title(f"{split}: {key}", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "metrics.png", dpi=110)
        plt.close(fig)
        written.append(out / "metrics.png")
    aucs = {m: report["methods"][m].get("privacy", {}).get("auc") for m in methods}
    if any(aucs.values()):  # membership inference: one group of bars per attack, 0.5 = unseen data
        from .privacy import ATTACKS

        fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(ATTACKS) * max(1, len(methods)) / 3, 3.2))
        width = 0.8 / len(methods)
        for i, m in enumerate(methods):
            vals = [(aucs[m] or {}).get(a, float("nan")) for a in ATTACKS]
            ax.bar([j + i * width for j in range(len(ATTACKS))], vals, width, label=m, color=f"C{i}")
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(ATTACKS))], list(ATTACKS), fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title("forget set: membership-inference AUC", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "privacy.png", dpi=110)
        plt.close(fig)
        written.append(out / "privacy.png")
    for name, folder in adapters.items():
        meta = folder / "unlearn.json"
        if not meta.is_file():
            continue
        res = json.loads(meta.read_text())["solver"]["residuals"]
        fig, ax = plt.subplots(figsize=(4.5, 3.2))
        ax.semilogy([r[0] for r in res], [max(r[1], 1e-12) for r in res], marker="o")
        ax.set_xlabel("iteration")
        ax.set_ylabel("‖(C+λI)x − b‖ / ‖b‖")
        ax.set_title(f"{name}: solver residual", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / f"residual_{name}.png", dpi=110)
        plt.close(fig)
        written.append(out / f"residual_{name}.png")
    return written
