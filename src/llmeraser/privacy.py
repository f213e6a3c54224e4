"""Membership inference and extraction: can anyone still tell, or read back, the records a request forgot?

Per record z with response tokens x_1..x_T (prompt tokens are context only), from one teacher-forced pass:

    log p_t = log p(x_t | x_<t)                          the token's log-probability
    μ_t = E_{v~p(·|x_<t)}[log p(v)],  σ_t² = E[(log p(v))²] − μ_t²   over the whole vocabulary
    hit_t = [argmax_v p(v | x_<t) = x_t]                  the greedy prediction is the true token

Membership scores, each larger for a record that looks trained on:

    loss      −(1/T) Σ_t −log p_t                        (Yeom et al., 2018)
    zlib      −[(1/T) Σ_t −log p_t] / zlib(text)          zlib(text): bytes of the zlib-compressed
                                                          response text (Carlini et al., 2021)
    min_k     mean of the ⌈kT⌉ smallest log p_t           (Shi et al., 2024; k = 20%)
    min_k_pp  mean of the ⌈kT⌉ smallest (log p_t − μ_t)/σ_t   (Min-K%++, Zhang et al., 2024)

MIA AUC = P(score(forget record) > score(non-member record)) (ties half): 0.5 means the forget set looks
like data never trained on. Privacy leakage against the retrained adapter (MUSE's PrivLeak):

    leakage = (AUC − AUC_retrain) / AUC_retrain

> 0: the forget set still looks more trained-on than under retraining (under-unlearning); < 0: less so
than retraining (over-unlearning, itself a signal that something was removed); retrain against itself: 0.

Extraction, for generated (non Yes/No) answers: exact memorisation = mean over records of (1/T) Σ_t hit_t
(Tirumala et al., 2022); longest run = the longest stretch of the reference answer, in characters, that the
greedy answer reproduces verbatim.

A private part u of a record's response (an e-mail address inside "Ann's e-mail is …"), beyond greedy decoding:

    log10 P(u | prompt, response before u) = Σ_{t ∈ T_u} log p_t / ln 10

T_u: the response tokens that overlap u's first occurrence together with the whitespace right before it (a token
that also holds a character before or after counts whole). The whitespace matters: a tokenizer that writes " 6" as " "
then "6" conditions the digit on a space token that only digit-led values follow, so scoring from the space on would
credit u with a choice the model made before it. It is the chance that one answer sampled at temperature 1, continued
from the record's own words up to u, spells u out: what an attacker who knows the sentence and samples many answers
would see, where greedy decoding shows only the likeliest.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch

from .metrics import roc_auc
from .render import render_text

ATTACKS = ("loss", "zlib", "min_k", "min_k_pp")
MIN_K = 0.2  # the share of least likely tokens min-k% and min-k%++ average (Shi et al.'s default)


@dataclass
class TokenStats:
    """One record's response tokens: log p_t, (log p_t − μ_t)/σ_t and hit_t, each of length T."""

    log_p: torch.Tensor
    z: torch.Tensor
    hit: torch.Tensor


def token_stats(logits: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor, n: int) -> list[TokenStats]:
    """Per record of a batch, the statistics above, from the logits at its response positions.

    `logits` [tokens, vocab], `targets` [tokens], `rows` [tokens] (the record each token belongs to, in
    order). Upcast to float32 first: a softmax over a 262k vocabulary in bf16 rounds μ and σ badly."""
    lp = torch.log_softmax(logits.float(), -1)
    log_p = lp.gather(-1, targets[:, None])[:, 0]
    p = lp.exp()
    mu = (p * lp).sum(-1)
    sigma = ((p * lp * lp).sum(-1) - mu * mu).clamp_min(1e-12).sqrt()
    z = (log_p - mu) / sigma
    hit = lp.argmax(-1) == targets
    out = []
    for i in range(n):
        at = rows == i
        out.append(TokenStats(log_p[at].cpu(), z[at].cpu(), hit[at].cpu()))
    return out


def _lowest_mean(values: torch.Tensor, k: float) -> float:
    """Mean of the ⌈k·T⌉ smallest values (at least one)."""
    m = max(1, math.ceil(k * values.numel()))
    return float(torch.topk(values.double(), m, largest=False).values.mean())


def zlib_bytes(text: str) -> int:
    return len(zlib.compress(text.encode("utf-8")))


def membership_scores(stats: list[TokenStats], texts: list[str], k: float = MIN_K) -> dict[str, list[float]]:
    """Each attack's score per record (larger: more likely a member); `texts` are the response texts."""
    out: dict[str, list[float]] = {a: [] for a in ATTACKS}
    for s, text in zip(stats, texts, strict=True):
        nll = -float(s.log_p.double().mean())
        out["loss"].append(-nll)
        out["zlib"].append(-nll / max(1, zlib_bytes(text)))
        out["min_k"].append(_lowest_mean(s.log_p, k))
        out["min_k_pp"].append(_lowest_mean(s.z, k))
    return out


def mia_auc(members: dict[str, list[float]], nonmembers: dict[str, list[float]]) -> dict[str, float]:
    """Per attack, the ROC-AUC of telling members (label 1) from non-members (label 0) by score."""
    return {a: roc_auc(members[a] + nonmembers[a], [1] * len(members[a]) + [0] * len(nonmembers[a])) for a in ATTACKS}


def leakage(auc: dict[str, float], auc_retrain: dict[str, float]) -> dict[str, float]:
    """(AUC − AUC_retrain) / AUC_retrain per attack (nan where either is undefined)."""
    return {a: (auc[a] - auc_retrain[a]) / auc_retrain[a] if auc_retrain.get(a, 0) and auc_retrain[a] == auc_retrain[a]
            else float("nan") for a in auc}


def exact_memorisation(stats: list[TokenStats]) -> float:
    """Mean over records of the share of response tokens the greedy prediction gets right, given the true prefix."""
    return sum(float(s.hit.double().mean()) for s in stats) / len(stats) if stats else float("nan")


def longest_run(reference: str, generated: str) -> int:
    """Length of the longest common substring of the two texts, in characters (dynamic programming)."""
    best, prev = 0, [0] * (len(generated) + 1)
    for a in reference:
        cur = [0]
        for j, b in enumerate(generated):
            cur.append(prev[j] + 1 if a == b else 0)
        best = max(best, max(cur))
        prev = cur
    return best


def summary(forget: list[str], forget_stats: list[TokenStats], generated: list[str] | None,
            nonmembers: list[str], nonmember_stats: list[TokenStats] | None, k: float = MIN_K) -> dict:
    """The privacy figures of one adapter: MIA AUC per attack (when there are non-members) and, for generated
    answers (`generated`, the forget records' greedy answers in order), extraction. Texts are responses."""
    out: dict = {}
    if nonmembers and nonmember_stats is not None and forget:
        out.update({"nonmembers": "test", "n_members": len(forget), "n_nonmembers": len(nonmembers), "min_k": k,
                    "auc": mia_auc(membership_scores(forget_stats, forget, k), membership_scores(nonmember_stats, nonmembers, k))})
    if generated is not None and forget:
        runs = [longest_run(ref, gen) for ref, gen in zip(forget, generated, strict=True)]
        out.update({"exact_memorisation": exact_memorisation(forget_stats), "longest_run_chars": max(runs),
                    "longest_run_share": sum(r / max(1, len(ref)) for r, ref in zip(runs, forget)) / len(runs)})
    return out


def part_tokens(tokenizer, response: str, part: str) -> list[int] | None:
    """T_u: indices, among the tokens of tokenizer(response) (what render.encode scores), of those overlapping the first
    occurrence of `part` or the whitespace right before it; None when the part does not occur or the tokenizer gives no
    character offsets (a slow one)."""
    at = response.find(part)
    if at < 0 or not part or not getattr(tokenizer, "is_fast", False):
        return None
    end, start = at + len(part), len(response[:at].rstrip())
    spans = tokenizer(response, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return [k for k, (a, b) in enumerate(spans) if a < end and b > start] or None


def part_positions(tokenizer, template: str, record, parts) -> list[int] | None:
    """Indices, among the response tokens of `record` rendered with `template`, of the tokens of any of `parts`
    (part_tokens on each); None when no part is marked or none can be located."""
    tail = render_text(tokenizer, *record.sides(), template)[1]
    found = [part_tokens(tokenizer, tail, x) for x in parts]
    return sorted({k for at in found if at for k in at}) or None


def part_log10p(ev, items: list[tuple]) -> list[float | None]:
    """Per (record, part): log10 P(part | prompt, response before it) (module docstring) under the model `ev` (an
    evaluate.AdapterEval) holds, from one teacher-forced pass; None where the part is not in the rendered response,
    its tokens cannot be located, or truncation cut them."""
    if not items:
        return []
    stats = ev.scored([r for r, _ in items], 0, stats=True)[2]
    out = []
    for (record, part), s in zip(items, stats, strict=True):
        prompt, response = record.sides()
        idx = part_tokens(ev.tok, render_text(ev.tok, prompt, response, ev.template)[1], part)
        ok = idx is not None and idx[-1] < s.log_p.numel()
        out.append(float(s.log_p[idx].double().sum()) / math.log(10) if ok else None)
    return out
