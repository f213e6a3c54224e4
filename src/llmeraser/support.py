"""Which of a removed record's tokens the kept records predict anyway (`reset_target` 'capped').

Retraining without a record fits the kept records; at a position of the removed answer it predicts what they
teach for that context. A value's pattern tokens (an IBAN's country code, an e-mail's "@") follow the same context
in most kept answers, so retraining still gives them; its memorised tokens (the digits, the domain chosen for this
person) follow it in few. Pushing the pattern tokens out too is what turned removed answers into garble where
retraining gives another well-formed value (docs/benchmarks-history.md#forgetting-well-formed).

The estimate is a back-off n-gram count over the kept records' response positions: for a token y after the context
c_k = its k preceding tokens (prompt tokens included, so a response's first token sees the template's last ones),

    share(y) = N(c_k, y) / N(c_k),   k the longest of K, …, 1 with N(c_k) ≥ MIN_SEEN,

N counting positions of kept responses, in two views: the tokens themselves (K = CONTEXT), and their shapes
(K = SHAPE_CONTEXT; a token's text with each run of digits written 9, of capitals A, of small letters a), which sees
what depends on position more than on words: the space after an IBAN's fourth digit follows four digits in every
kept IBAN, though after those four digits' own tokens it follows rarely. y is supported when its share in either
view is ≥ SUPPORTED (most kept answers continue the context with it); with no context seen MIN_SEEN times, it is not.
A third view, off unless `chars` (CHAR_CONTEXT) is set, keys on the last characters with every letter and digit
written x, no runs merged ("is 7F2W" → "xx xxxx"): it counts characters whatever the tokens that spell them, so
after a kept code's fourth character it knows one more follows, where the shapes, merging "FM" and "F", may read a
code's end. Cheap (counts over token ids, no model) and exact for what it counts; what it does not model (a name
copied from the prompt) stays unsupported, pushed as before.

A word rule, off unless `words` (the setting capped_words), also supports a token that completes a word the kept
responses spell (word_completion): y starts with a small letter, the response so far ends in a small-letter word c of
two or more letters (with the character before it, and at most one after), and every occurrence of c in the kept
responses goes on with y's text, one being enough. Why: "x" after "@gm" where one kept address is at gmx.net; the
counts need a context seen MIN_SEEN times, so they leave it capped, the rounds push it, and the push carries over to
that kept address, which retraining answers (BENCHMARKS.md#forgetting-lost-retained). One occurrence is enough for
words only: MIN_SEEN 1 everywhere also freed coincidental digits of IBANs and codes.

An unsupported token's target (capped_target) mixes the same counts' continuation distribution, retraining's pattern
(other digits after "DE"), with the adapter's own prediction, and caps the memorised token at τ.
"""

from __future__ import annotations

import math
import re
from collections import Counter

import torch

CONTEXT = 3  # the longest context of the token view, in tokens
SHAPE_CONTEXT = 6  # the longest context of the shape view
# the longest context of the character view, in characters; 0: no such view (the setting capped_chars). Off in the
# recipe: better-formed targets did not give better-formed answers (BENCHMARKS.md#forgetting-char-view)
CHAR_CONTEXT = 0
MIN_SEEN = 2  # a context must occur this often among the kept responses to speak for retraining
SUPPORTED = 0.5  # share of those occurrences continued by the same token
SURE_SEEN = 5  # a view's context must occur this often for its sureness to override the token view (distribution)
KEPT_WEIGHT = 0.9  # the kept continuations' share of a capped target (capped_target)
# the word rule's context: a small-letter word of 2+ letters ending the text, the character before it, at most one after
WORD_END = re.compile(r"[^a-z][a-z]{2,}[^a-z]?\Z")


def char_classes(text: str) -> str:
    """Each digit written "9", capital "A", other letter "a", every other character as it is: "DE12" -> "AA99"."""
    return "".join("9" if ch.isdigit() else "A" if ch.isupper() else "a" if ch.isalpha() else ch for ch in text)


def shape(text: str) -> str:
    """A token's char_classes with each run of 9, A or a merged: " DE" -> " A", "4711" -> "9", "Rosa" -> "Aa"."""
    out = []
    for c in char_classes(text):
        if not (out and c in "9Aa" and out[-1] == c):
            out.append(c)
    return "".join(out)


class _Counts:
    """N(c) and N(c, y) over the response positions of `kept`, c each context `contexts(ids, t)` gives for ids[t]
    (longest first; the view's back-off order)."""

    def __init__(self, kept: list, contexts):
        self.contexts = contexts
        self.seen, self.after = Counter(), {}
        for x in kept:
            ids = tuple(x.input_ids)
            for t in range(max(x.n_prompt, 1), len(ids)):
                for c in contexts(ids, t):
                    self.seen[c] += 1
                    self.after.setdefault(c, Counter())[ids[t]] += 1

    def context(self, ids: tuple, t: int):
        """The longest context of ids[t] seen MIN_SEEN times, or None."""
        return next((c for c in self.contexts(tuple(ids), t) if self.seen[c] >= MIN_SEEN), None)

    def share(self, ids: tuple, t: int) -> float | None:
        c = self.context(ids, t)
        return None if c is None else self.after[c][ids[t]] / self.seen[c]

    def distribution(self, ids: tuple, t: int) -> dict | None:
        """{token: N(c_k, token) / N(c_k)} at that context, or None."""
        c = self.context(ids, t)
        return None if c is None else {y: m / self.seen[c] for y, m in self.after[c].items()}


def _token_contexts(key, longest: int):
    """c_k = (key(ids[t − k]), …, key(ids[t − 1])) for k = min(longest, t), …, 1."""
    def contexts(ids, t):
        keys = tuple(key(i) for i in ids[max(t - longest, 0):t])
        return [keys[len(keys) - k:] for k in range(len(keys), 0, -1)]
    return contexts


def _char_contexts(text_of, longest: int):
    """The last w characters before ids[t], each letter or digit written x, every other character as it is (no runs
    merged), for w = min(longest, characters there), …, 1: a context that counts characters whatever the tokens that
    spell them. Letters and digits are one class: the shape view tells them apart, and one class pools the kept values
    whose characters differ in kind but not in position (BENCHMARKS.md#forgetting-char-view)."""
    def contexts(ids, t):
        text, j = "", t
        while j > 0 and len(text) < longest:
            j -= 1
            text = text_of(ids[j]) + text
        text = "".join("x" if ch.isalnum() else ch for ch in text[-longest:])
        return [text[len(text) - w:] for w in range(len(text), 0, -1)]
    return contexts


def word_completion(before: str, token: str, kept_text: str) -> str | None:
    """The context c that makes `token` a completion of a word the kept responses spell (the word rule, module
    docstring), or None: c = WORD_END's match at the end of `before` (the response's text before `token`), `token`
    starts with a small letter, and c occurs in `kept_text` (the kept responses' texts joined by NUL, which no c
    holds), each time followed by `token`'s text."""
    m = WORD_END.search(before)
    if m is None or not (token[:1].isalpha() and token[:1].islower()):
        return None
    c = m.group(0)
    found, at = False, kept_text.find(c)
    while at >= 0:
        if not kept_text.startswith(token, at + len(c)):
            return None
        found, at = True, kept_text.find(c, at + 1)
    return c if found else None


class KeptContinuations:
    """The kept records' continuations in the token view and, given a tokenizer, the shape view and, with `chars` > 0,
    the character view of that many characters; with `words` (a tokenizer needed) the word rule too (module
    docstring)."""

    def __init__(self, kept: list, tokenizer=None, chars: int = CHAR_CONTEXT, words: bool = False):
        self.views = [_Counts(kept, _token_contexts(lambda i: i, CONTEXT))]
        self.shape_of = self.text_of = self.kept_text = None
        if words and tokenizer is None:
            raise ValueError("the word rule reads the tokens' texts: give a tokenizer")
        if tokenizer is not None:
            texts, shapes = {}, {}

            def text_of(i):
                if i not in texts:
                    texts[i] = tokenizer.decode([i])
                return texts[i]

            def of(i):
                if i not in shapes:
                    shapes[i] = shape(text_of(i))
                return shapes[i]
            self.shape_of, self.text_of = of, text_of
            self.views.append(_Counts(kept, _token_contexts(of, SHAPE_CONTEXT)))
            if chars:
                self.views.append(_Counts(kept, _char_contexts(text_of, chars)))
            if words:
                self.kept_text = "\0".join("".join(map(text_of, x.input_ids[x.n_prompt:])) for x in kept)

    def share(self, ids: tuple, t: int) -> float | None:
        """The largest share(ids[t]) over the views, each at its longest context seen MIN_SEEN times; None when no
        view has seen one."""
        found = [s for s in (v.share(tuple(ids), t) for v in self.views) if s is not None]
        return max(found) if found else None

    def distribution(self, ids: tuple, t: int) -> dict | None:
        """The continuation distribution after ids[:t], the estimate of retraining's prediction there: the token view's,
        unless another view whose context was seen N ≥ SURE_SEEN times is surer what kind of token comes next (lower
        _shape_entropy); with no token context seen, the first view that has one; None if none has. Why: the tokens
        know words the shapes merge (after " address is" no access code follows, though it reads like " code is"); the
        shapes know positions the tokens cannot see (inside a run of digit tokens, where an IBAN's group ends).
        SURE_SEEN because shapes also merge lengths ("FM" reads like "F"). BENCHMARKS.md#forgetting-iban-groups."""
        ids = tuple(ids)
        best = None
        for i, v in enumerate(self.views):
            c = v.context(ids, t)
            if c is None:
                continue
            d = v.distribution(ids, t)
            h = self._shape_entropy(d, v.seen[c])
            if best is None or (i > 0 and v.seen[c] >= SURE_SEEN and h < best[1]):
                best = d, h
        return None if best is None else best[0]

    def _shape_entropy(self, d: dict, seen: int) -> float:
        """H = −Σ_s P(s) log P(s) over the next token's shape s, P(s) = Σ_{y : shape(y) = s} d(y) · N/(N + 1) and an
        unseen shape's 1/(N + 1), d read from N = `seen` occurrences: a sureness read from few counts for less."""
        if self.shape_of is None:
            return 0.0
        mass = Counter()
        for y, p in d.items():
            mass[self.shape_of(y)] += p * seen / (seen + 1)
        mass[None] = 1 / (seen + 1)
        # rounded: equal counts and a sure shape are equal in either view, and tie to the token view
        return round(-sum(p * math.log(p) for p in mass.values() if p > 0), 9)

    def unsupported(self, example, positions: list[int] | None) -> list[int]:
        """The indices among `positions` (response-token indices of `example`; None: all of them) whose token the
        kept records do not predict: share < SUPPORTED, or no context seen, and (with `words`) not a word's
        completion."""
        ids = tuple(example.input_ids)
        # a part past max_length's cut has positions beyond the encoded response: nothing there to pull
        at = range(example.n_response) if positions is None else [k for k in positions if k < example.n_response]
        out = []
        for k in at:
            t = example.n_prompt + k
            s = self.share(ids, t)
            if (s is None or s < SUPPORTED) and not self._completes_word(ids, example.n_prompt, t):
                out.append(k)
        return out

    def _completes_word(self, ids: tuple, start: int, t: int) -> bool:
        """The word rule at ids[t], the response starting at ids[start]; False when off."""
        if self.kept_text is None:
            return False
        before = "".join(map(self.text_of, ids[start:t]))
        return word_completion(before, self.text_of(ids[t]), self.kept_text) is not None


def others_logsumexp(z, targets):
    """logsumexp over v ≠ y of each row's z_v, y its target: with log-probabilities, log(1 − p_y) exactly, where
    log1p(−p_y) loses a p_y that float32 rounds to 1. z: [rows, vocab], targets: [rows]."""
    return torch.logsumexp(z.scatter(1, targets[:, None], -torch.inf), -1)


def capped_logits(z, targets, cap: float):
    """Logits whose softmax is the I-projection of softmax(z) onto {q : q_y ≤ cap} at each row's target y:
    q_y = min(p_y, cap), the other tokens' mass scaled by (1 − q_y)/(1 − p_y), their ratios kept
    (argmin of KL(q ‖ p) under the cap). In logits: z_y ← min(z_y, log(cap/(1 − cap)) + logsumexp_{v≠y} z_v),
    every other logit unchanged. z: [rows, vocab] (float32 or wider), targets: [rows]."""
    rows = torch.arange(z.shape[0], device=z.device)
    own = z[rows, targets]
    others = others_logsumexp(z, targets)
    out = z.clone()
    out[rows, targets] = torch.minimum(own, others + math.log(cap / (1 - cap)))
    return out


def capped_positions(problem, request, chars: int = CHAR_CONTEXT, words: bool = False) -> dict:
    """{id of each removal and response correction: {index among its (old) record's response tokens: the kept
    continuation distribution there, or None}} over the tokens reset_target 'capped' pulls: those of its marked private
    parts (all its response tokens when none is marked or found) that the kept records do not predict (`chars`,
    `words`: KeptContinuations'). A map may be empty: every such token is one retraining gives too. A correction's
    map serves repair_old (repair.replaced_values, which drops the tokens its new answer shares). Computed once per
    request object, `chars` and `words` (cached on the problem, as Problem.sets is)."""
    key = (id(request), chars, words)
    hit = problem._capped.get(key)
    if hit is not None and hit[0] is request:
        return hit[1]
    kept = KeptContinuations(problem.sets(request).kept, problem.tokenizer, chars, words)
    out = {}
    for e in request.edits:
        if e.op in ("remove", "correct_response"):
            x = problem.examples[e.index]
            at = kept.unsupported(x, problem.part_positions(e.old, e.private) if e.private else None)
            out[e.id] = {k: kept.distribution(x.input_ids, x.n_prompt + k) for k in at}
    problem._capped[key] = (request, out)
    return out


def capped_by_sample(problem, request, chars: int = CHAR_CONTEXT, words: bool = False) -> dict:
    """capped_positions keyed by id(encoded removed sample), as reset.OutputReset takes them."""
    at = capped_positions(problem, request, chars, words)
    return {id(problem.examples[e.index]): at[e.id] for e in request.edits if e.op == "remove"}


def capped_target(z, targets, kept: list, cap: float, own: float = 0.0):
    """Target logits at capped rows: log q*, q* = the I-projection onto {q_y ≤ cap} of
        q = KEPT_WEIGHT·K + (1 − KEPT_WEIGHT)·p,   p = softmax(z)
    at each row's own token y, K its kept continuation distribution ({token: probability}; a row whose K is None gets
    p alone). K is what the kept records teach after this context, retraining's pattern (another IBAN's digits after
    "DE"); the adapter's own share keeps every token's target finite and the rest of its prediction.
    `own` = φ > 0 first replaces p by its I-projection onto {p_y ≤ φ} (capped_logits), so that
        q*_y = min(KEPT_WEIGHT·K(y) + (1 − KEPT_WEIGHT)·min(p_y, φ), cap)
    follows what the kept records write, down to (1 − KEPT_WEIGHT)·φ where none writes y (φ on a row without K).
    Why: with φ = 0 (off) a memorised y (p_y ≈ 1) has q*_y = cap whatever K says, and retraining leaves most such
    tokens far below it (BENCHMARKS.md#forgetting-tau). Off in every recipe: the gradient round, not this target, set
    where the tokens ended (BENCHMARKS.md#forgetting-own)."""
    lp = torch.log_softmax(capped_logits(z, targets, own) if own else z, -1)
    rows = []
    for r, k in enumerate(kept):
        if k is None:
            rows.append(lp[r])
            continue
        ids = torch.tensor(list(k), device=z.device)
        logk = torch.full_like(lp[r], -math.inf).index_put((ids,), torch.tensor(list(k.values()), dtype=z.dtype, device=z.device).log())
        rows.append(torch.logaddexp(math.log(KEPT_WEIGHT) + logk, math.log(1 - KEPT_WEIGHT) + lp[r]))
    return capped_logits(torch.stack(rows) if rows else lp, targets, cap)
