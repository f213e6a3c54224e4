"""Metric functions with no model in them: ROC-AUC, ROUGE-1/2/L F1, exact match, vector similarity,
and a paired bootstrap interval for the difference of two adapters' metric on the same records."""

from __future__ import annotations

import random
import re
from typing import Callable

import torch


def roc_auc(scores: list[float], labels: list[int]) -> float:
    """Area under the ROC curve (Mann-Whitney U with ties counted half); nan if one class is absent."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return float("nan")
    ranked = sorted((s, i) for i, s in enumerate(scores))
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(ranked):  # average ranks over ties
        j = i
        while j + 1 < len(ranked) and ranked[j + 1][0] == ranked[i][0]:
            j += 1
        for k in range(i, j + 1):
            ranks[ranked[k][1]] = (i + j) / 2 + 1
        i = j + 1
    rank_sum = sum(r for r, y in zip(ranks, labels) if y)
    return (rank_sum - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))


_SCORER = None


def rouge(reference: str, hypothesis: str) -> dict[str, float]:
    """ROUGE-1, ROUGE-2 and ROUGE-L F1 by the `rouge-score` package (Google's reimplementation of ROUGE-1.5.5)
    with its Porter stemmer: the figures DialogSum papers report (docs/design.md#rouge)."""
    global _SCORER
    if _SCORER is None:
        from rouge_score import rouge_scorer

        _SCORER = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    got = _SCORER.score(reference, hypothesis)
    return {k: got[k].fmeasure for k in ("rouge1", "rouge2", "rougeL")}


def exact_match(reference: str, hypothesis: str) -> float:
    return float(" ".join(reference.split()) == " ".join(hypothesis.split()))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    if na == 0 or nb == 0:
        return float("nan") if na == 0 and nb != 0 or nb == 0 and na != 0 else 1.0
    return float(torch.dot(a, b) / (na * nb))


def relative_distance(a: torch.Tensor, reference: torch.Tensor) -> float:
    """‖a − reference‖ / ‖reference‖ (0 when both are 0)."""
    nr = torch.linalg.vector_norm(reference)
    d = torch.linalg.vector_norm(a - reference)
    return float(d / nr) if nr > 0 else (0.0 if d == 0 else float("inf"))


def paired_bootstrap(difference: Callable[[list[int]], float], n: int, reps: int = 2000, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float, float]:
    """(difference on all n records, low, high): the percentile interval of `difference(idx)` over `reps`
    resamples idx of the n records drawn with replacement, the same idx for both adapters.

    Pairing matters: two adapters scored on the same 16 test dialogues differ far less from resample to
    resample than either mean does, so the interval is of the difference itself. Resamples where the
    statistic is undefined (nan: an AUC on a resample holding one class) are left out."""
    if n < 1:
        raise ValueError("paired_bootstrap needs at least one record")
    rng = random.Random(seed)
    values = sorted(v for v in (difference([rng.randrange(n) for _ in range(n)]) for _ in range(reps)) if v == v)
    point = difference(list(range(n)))
    if not values:
        return point, float("nan"), float("nan")
    tail = (1 - level) / 2
    pick = lambda q: values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]  # noqa: E731
    return point, pick(tail), pick(1 - tail)
