"""Which of a removed record's tokens the kept records predict anyway (`reset_target` 'capped').

Retraining without a record fits the kept records; at a position of the removed answer it predicts what they
teach for that context. A value's pattern tokens (an IBAN's country code, an e-mail's "@") follow the same context
in most kept answers, so retraining still gives them; its memorised tokens (the digits, the domain chosen for this
person) follow it in few. Pushing the pattern tokens out too is what turned removed answers into garble where
retraining gives another well-formed value (BENCHMARKS.md#forgetting-well-formed).

The estimate is a back-off n-gram count over the kept records' response positions: for a token y after the context
c_k = its k preceding tokens (prompt tokens included, so a response's first token sees the template's last ones),

    share(y) = N(c_k, y) / N(c_k),   k the longest of CONTEXT, …, 1 with N(c_k) ≥ MIN_SEEN,

N counting positions of kept responses. y is supported when share(y) ≥ SUPPORTED (most kept answers continue the
context with it); with no context seen MIN_SEEN times, it is not. Cheap (one pass over token ids, no model) and
exact for what it counts; what it does not model (a name copied from the prompt) stays unsupported, as before.
"""

from __future__ import annotations

import math
from collections import Counter

import torch

CONTEXT = 3  # the longest context, in tokens
MIN_SEEN = 2  # a context must occur this often among the kept responses to speak for retraining
SUPPORTED = 0.5  # share of those occurrences continued by the same token


class KeptContinuations:
    """N(c_k) and N(c_k, y) over the response positions of `kept` (render.Example), k = 1 … CONTEXT."""

    def __init__(self, kept: list):
        self.seen, self.next = Counter(), Counter()
        for x in kept:
            ids = tuple(x.input_ids)
            for t in range(max(x.n_prompt, 1), len(ids)):
                for k in range(1, CONTEXT + 1):
                    if t - k < 0:
                        break
                    c = ids[t - k:t]
                    self.seen[c] += 1
                    self.next[c + (ids[t],)] += 1

    def share(self, ids: tuple, t: int) -> float | None:
        """share(ids[t]) after ids[:t] by the longest context seen MIN_SEEN times; None when none is."""
        for k in range(min(CONTEXT, t), 0, -1):
            c = tuple(ids[t - k:t])
            if self.seen[c] >= MIN_SEEN:
                return self.next[c + (ids[t],)] / self.seen[c]
        return None

    def unsupported(self, example, positions: list[int] | None) -> list[int]:
        """The indices among `positions` (response-token indices of `example`; None: all of them) whose token the
        kept records do not predict: share < SUPPORTED, or no context seen."""
        ids = tuple(example.input_ids)
        at = range(example.n_response) if positions is None else positions
        out = []
        for k in at:
            s = self.share(ids, example.n_prompt + k)
            if s is None or s < SUPPORTED:
                out.append(k)
        return out


def capped_logits(z, targets, cap: float):
    """Logits whose softmax is the I-projection of softmax(z) onto {q : q_y ≤ cap} at each row's target y:
    q_y = min(p_y, cap), the other tokens' mass scaled by (1 − q_y)/(1 − p_y), their ratios kept
    (argmin of KL(q ‖ p) under the cap). In logits: z_y ← min(z_y, log(cap/(1 − cap)) + logsumexp_{v≠y} z_v),
    every other logit unchanged. z: [rows, vocab] (float32 or wider), targets: [rows]."""
    rows = torch.arange(z.shape[0], device=z.device)
    own = z[rows, targets]
    others = torch.logsumexp(z.index_put((rows, targets), torch.tensor(-math.inf, dtype=z.dtype, device=z.device)), -1)
    out = z.clone()
    out[rows, targets] = torch.minimum(own, others + math.log(cap / (1 - cap)))
    return out


def capped_positions(problem, request) -> dict:
    """{id of each removal: the indices, among its record's response tokens, that reset_target 'capped' pulls}: those
    of its marked private parts (all its response tokens when none is marked or found) that the kept records do not
    predict. A list may be empty: every such token is one retraining gives too."""
    kept = KeptContinuations(problem.sets(request).kept)
    return {e.id: kept.unsupported(problem.examples[e.index], problem.part_positions(e.old, e.private) if e.private else None)
            for e in request.edits if e.op == "remove"}
