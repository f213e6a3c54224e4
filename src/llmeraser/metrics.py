"""Metric functions with no model in them: ROC-AUC, ROUGE-N/L F1, exact match, vector similarity,
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


def _tokens(text: str) -> list[str]:
    """rouge-score's default tokenisation without stemming: lower case, runs of [a-z0-9]."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def _f1(overlap: int, n_ref: int, n_hyp: int) -> float:
    if overlap == 0 or n_ref == 0 or n_hyp == 0:
        return 0.0
    p, r = overlap / n_hyp, overlap / n_ref
    return 2 * p * r / (p + r)


def rouge_n(reference: str, hypothesis: str, n: int) -> float:
    def grams(toks):
        out: dict[tuple, int] = {}
        for i in range(len(toks) - n + 1):
            g = tuple(toks[i:i + n])
            out[g] = out.get(g, 0) + 1
        return out

    ref, hyp = grams(_tokens(reference)), grams(_tokens(hypothesis))
    overlap = sum(min(c, hyp.get(g, 0)) for g, c in ref.items())
    return _f1(overlap, sum(ref.values()), sum(hyp.values()))


def rouge_l(reference: str, hypothesis: str) -> float:
    ref, hyp = _tokens(reference), _tokens(hypothesis)
    prev = [0] * (len(hyp) + 1)
    for a in ref:  # longest common subsequence, one row at a time
        cur = [0]
        for j, b in enumerate(hyp):
            cur.append(prev[j] + 1 if a == b else max(prev[j + 1], cur[j]))
        prev = cur
    return _f1(prev[-1], len(ref), len(hyp))


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
