"""Did the edit take? Checked by greedy generation, as a user would check it by hand.

Each probe asks the adapter one record's prompt and looks for target strings in its greedy answer,
compared case-folded and without whitespace (a hit: any target occurs in the answer; "555 1234" gives
away "5551234", and some tokenizers decode with spaces between tokens):

    remove            removed   the edit's 'private' parts, else the old response      must be absent
    correct_response  new       the new response                                       must be present, sure
                      old       the old 'private' parts, else the old response         must be absent
    modify_query      query     the response, asked with the new prompt                must be present, sure
                      old       the 'private' parts of the old prompt, if marked       must be absent
    retained sample   retained  the response of a kept record (seeded sample)          must stay present

"Sure": a new answer must also be certain by one teacher-forced pass (every token's p_t > 0.6, SURE_NLL), not a
near-tie that greedy decoding resolves one way in this batch and another in a deployment.

An old response that a kept record also gives (a label such as "Yes.", a common attribute) is not the
removed record's own: retraining without it gives the same answer, so it is not checked ('shared');
a private value inside a longer answer is checked by marking it 'private'. A marked private value that a kept record's
answer also holds (a condition, a city: a category many people share) stays checked, but a still-produced one is
counted apart ('still_produced_common'): retraining, which learns the value from the kept records, can give it by
chance (BENCHMARKS.md#gradient-repair: one of 14 removed conditions on an n = 256 run). The retained share counts only
answers the adapter produced before the edit: one it never produced is not lost by the edit.

    verified = no checked removed or old target produced or leaked, every new and query target produced, and at
               least RETAINED_KEPT_MIN of the retained answers produced before still produced.

A removed or replaced target absent from its own answer can still come out of another prompt's: a memorised
e-mail address given as the answer to its owner's condition. Every asked prompt's answer is searched for every
checked 'private' part ('leaked'; an unmarked old answer, often a short label, is not searched); a hit counts where
that prompt's own responses (its record's, and an edited record's old one) do not hold the target, and fails the
check as a produced target does. A target kept records also hold ('common': a condition, a city) is not searched
for: another person's answer may give it by chance.

The retained share is a sample's (verify_retained records), so it comes with its Wilson score interval at 95%
confidence ('kept_interval'): the range of kept shares over every kept record that the sample does not rule out.
The verdict uses the sample's share alone; the interval says how far to trust it (61 of 64 kept reads 95.3%, and
the interval is 87–98%: docs/benchmarks-history.md#forgetting-n128-cc-s1, where a second sample of 48 kept 94%).

Generation is the slow part (one decoding step per answer token): a prompt whose record's response a single
teacher-forced pass shows greedy decoding certainly gives (every token's p_t > 0.6, SURE_NLL), and in which every
probe's target is found, is settled from that pass; only the others are generated. The figures are the same as
generating every answer; the check records how many prompts it generated.

Beyond greedy decoding, each removed or replaced target (a 'private' part, else the old answer) inside its record's
old response is scored by one teacher-forced pass: log10 P(target | prompt, old response before it) (privacy.py),
at Θ, at Θ̂ and under the base model alone, and reported ("extraction"). A value retraining never saw has a small
probability, not zero, and there is no retraining here to compare it with, so it is judged only when asked
(the setting verify_extractable = m > 0): a removed record's target, or a correction's old one, with

    log10 P_Θ(target | its sentence) > log10 P_base(target | its sentence) + m

is "still likely" and fails the check as a produced one does (docs/benchmarks-history.md#removed-likelihood: after a greedy-verified
removal an access code kept P = 0.16 where retraining gave it 1e-19).

No generated text is stored: the answers to removed prompts are the private data being removed.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import torch

from . import distributed
from .curvature import seeded_subset
from .data import EditRequest, Record
from .modeling import adapter_at, fused_attention, merged_adapter
from .privacy import part_log10p

RETAINED_KEPT_MIN = 0.95  # the scenario suite's pass criterion for retained fields (BENCHMARKS.md)
# an answer whose every token has teacher-forced −log p_t below ln 2 (p_t > ½, the argmax): greedy decoding reproduces it
CERTAIN_NLL = math.log(2)
# −log p_t below this for every response token (p_t > 0.6, a lead of over ln 1.5 ≈ 0.4 nats on every other token,
# a margin for rounding differences between a teacher-forced pass and cached decoding): greedy decoding reproduces
# the response, so the check needs no generation for it (Verifier._hits)
SURE_NLL = math.log(5 / 3)
SURE_KINDS = ("new", "query")  # probes whose answer must be produced with every token above that bound, not on a near-tie
MARGIN_TOKENS = 8  # generated beyond the longest target, so a target after a short preamble is still seen
Z95 = 1.959964  # the standard normal's two-sided 95% quantile, for wilson()


def wilson(k: int, m: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a share from k successes in m draws: the p with (k/m − p)² ≤ z²·p(1 − p)/m,

        (k/m + z²/2m ± z·√(k/m·(1 − k/m)/m + z²/4m²)) / (1 + z²/m)

    Why Wilson and not k/m ± z·√(k/m·(1 − k/m)/m): at k = m that interval has width 0, and a check's sample is
    usually all kept. m = 0: (0, 1), nothing is known."""
    if m == 0:
        return 0.0, 1.0
    q, a = k / m, z * z / m
    mid, half = q + a / 2, z * math.sqrt(q * (1 - q) / m + a / (4 * m))
    return max(0.0, (mid - half) / (1 + a)), min(1.0, (mid + half) / (1 + a))


def normalise(text: str) -> str:
    return "".join(text.split()).casefold()


def produced(answer: str, targets: tuple[str, ...]) -> bool:
    """Whether any target occurs in the answer, case-folded and with whitespace removed."""
    a = normalise(answer)
    return any(normalise(t) in a for t in targets)


@dataclass(frozen=True)
class Probe:
    id: str  # the record's id
    kind: str  # removed, new, old, query or retained
    ask: Record  # whose prompt is asked
    targets: tuple[str, ...]
    shared: bool = False  # a removed or old answer a kept record also gives: not checked
    common: bool = False  # a marked private target a kept record's answer also holds: checked, counted apart
    marked: bool = False  # the targets are the edit's 'private' parts (searched for in other answers: leaks)


def probes(request: EditRequest, records: list[Record], retained: int, seed: int) -> list[Probe]:
    """The probes of a request, edits first, then a seeded sample of `retained` kept records."""
    edited = {e.id for e in request.edits}
    kept = [r for r in records if r.id not in edited]
    kept_answers = {normalise(r.sides()[1]) for r in kept}
    # every kept answer in one string, so that "does a kept answer hold this value" is one substring search
    kept_text = "\x00".join(sorted(kept_answers))
    common = lambda targets: any(normalise(t) in kept_text for t in targets)
    out = []
    for e in request.edits:
        old_response = e.old.sides()[1]
        if e.op == "modify_query":
            out.append(Probe(e.id, "query", e.new, (old_response,)))
            if e.private:  # a private field of the old query must not surface in the answer to the new one
                out.append(Probe(e.id, "old", e.new, e.private, marked=True))
            continue
        # without 'private' marks the whole old answer is the target; shared with a kept record, it is unchecked
        shared = not e.private and normalise(old_response) in kept_answers
        if e.op == "remove":
            out.append(Probe(e.id, "removed", e.old, e.private or (old_response,), shared, bool(e.private) and common(e.private),
                             bool(e.private)))
        else:
            new_response = e.new.sides()[1]
            old_targets = e.private or (old_response,)
            # an old target inside the new answer cannot be absent from a correct one
            unchecked = shared or any(normalise(t) in normalise(new_response) for t in old_targets)
            out.append(Probe(e.id, "new", e.new, (new_response,)))
            out.append(Probe(e.id, "old", e.new, old_targets, unchecked, bool(e.private) and common(e.private), bool(e.private)))
    out += [Probe(r.id, "retained", r, (r.sides()[1],)) for r in seeded_subset(kept, retained, seed)[:retained]]
    return out


def own_responses(probe_list: list[Probe], index: list[int], n_asks: int, request: EditRequest) -> list[str]:
    """Per asked prompt (index[k]: probe k's), the responses it may give of its own, normalised and joined: its
    record's, and an edited record's old one. A target found there is the prompt's own value, not a leak."""
    olds = {e.id: e.old.sides()[1] for e in request.edits}
    own: list[set[str]] = [set() for _ in range(n_asks)]
    for i, p in zip(index, probe_list, strict=True):
        own[i].update(normalise(t) for t in (p.ask.sides()[1], olds.get(p.id, "")) if t)
    return ["\x00".join(sorted(texts)) for texts in own]


def leaks(probe_list: list[Probe], index: list[int], answers: list[str], own: list[str]) -> list[bool]:
    """Per probe: a checked, marked removed or replaced target that is not common, absent from its own answer
    (answers[index[k]]) but present in another asked prompt's answer whose own responses, `own[j]` (normalised and
    joined), do not hold it. One substring search per (target, answer): no generation."""
    out = []
    for p, i in zip(probe_list, index, strict=True):
        hit = False
        if p.marked and not p.shared and not p.common and not produced(answers[i], p.targets):
            hit = any(j != i and normalise(t) not in own[j] and produced(a, (t,))
                      for t in p.targets for j, a in enumerate(answers))
        out.append(hit)
    return out


def judge(probe_list: list[Probe], before: list[bool], after: list[bool], likely: list[bool] | None = None,
          leaked: list[bool] | None = None) -> dict:
    """The verification's figures and verdict from each probe's hit before and after the edit; `likely` (Verifier.likely),
    per probe: a removed target not produced but still likely by sampling, a failure like a produced one; `leaked`
    (leaks), per probe: a removed target given in another prompt's answer, a failure too."""
    rows = list(zip(probe_list, before, after))
    judged, likely = likely is not None, likely or [False] * len(probe_list)
    searched, leaked = leaked is not None, leaked or [False] * len(probe_list)

    def of(kind, checked_only=True):
        return [(b, a) for p, b, a in rows if p.kind == kind and not (checked_only and p.shared)]

    def present(kind):  # must be produced
        pairs = of(kind)
        return {"checked": len(pairs), "produced": sum(a for _, a in pairs), "produced_before": sum(b for b, _ in pairs)}

    def absent(kind):  # must no longer be produced
        pairs = of(kind)
        return {"checked": len(pairs), "unchecked": len(of(kind, False)) - len(pairs),
                "produced_before": sum(b for b, _ in pairs), "still_produced": sum(a for _, a in pairs),
                "still_produced_common": sum(a for p, _, a in rows if p.kind == kind and not p.shared and p.common)}

    retained = of("retained")
    kept_before = sum(b for b, _ in retained)
    kept = sum(b and a for b, a in retained)
    share = kept / kept_before if kept_before else 1.0
    figures = {"removed": absent("removed"), "corrected": present("new"), "queries": present("query"),
               "old": absent("old"),
               "retained": {"sampled": len(retained), "produced_before": kept_before, "kept": kept, "kept_share": share,
                            "kept_interval": list(wilson(kept, kept_before))}}
    if judged:
        for kind in ("removed", "old"):
            figures[kind]["still_likely"] = sum(x and not a and not p.shared for (p, _, a), x in zip(rows, likely)
                                                if p.kind == kind)
    if searched:
        for kind in ("removed", "old"):
            figures[kind]["leaked"] = sum(x for (p, _, _), x in zip(rows, leaked) if p.kind == kind and not p.shared)
    failures = []
    for key, what in (("removed", "removed answers"), ("old", "replaced answers or private parts")):
        if figures[key].get("leaked"):
            failures.append(f"{figures[key]['leaked']} of {figures[key]['checked']} {what} not in their own answer but "
                            "given in another asked prompt's")
        if figures[key]["still_produced"]:
            common = figures[key]["still_produced_common"]
            failures.append(f"{figures[key]['still_produced']} of {figures[key]['checked']} {what} still produced"
                            + (f" ({common} of them a value kept records also hold, which retraining may give by chance)"
                               if common else ""))
        if figures[key].get("still_likely"):
            failures.append(f"{figures[key]['still_likely']} of {figures[key]['checked']} {what} not produced but still "
                            "likely by sampling (verify_extractable)")
    for key, what in (("corrected", "corrections"), ("queries", "answers to modified queries")):
        missing = figures[key]["checked"] - figures[key]["produced"]
        if missing:
            failures.append(f"{missing} of {figures[key]['checked']} {what} not produced")
    if share < RETAINED_KEPT_MIN:
        failures.append(f"{kept} of {kept_before} sampled retained answers kept (< {RETAINED_KEPT_MIN:.0%})")
    records = [{"id": p.id, "kind": p.kind, "checked": not p.shared, "common": p.common, "before": b, "after": a, "likely": x,
                "leaked": y} for (p, b, a), x, y in zip(rows, likely, leaked)]
    return {"verified": not failures, "failures": failures, **figures, "records": records}


def shortfall(v: dict) -> int:
    """How many records a verification misses by: removed or replaced answers still produced (or likely, or leaked),
    corrections and answers to modified queries missing, and retained answers lost beyond what RETAINED_KEPT_MIN allows.
    0 exactly when this module's checks pass (verify_capped's count of tokens, added in api.verify_edit, is apart)."""
    k = v["retained"]
    allowed_loss = k["produced_before"] - math.ceil(RETAINED_KEPT_MIN * k["produced_before"] - 1e-9)
    lost = k["produced_before"] - k["kept"]
    return (sum(v[key]["still_produced"] + v[key].get("still_likely", 0) + v[key].get("leaked", 0) for key in ("removed", "old"))
            + sum(v[key]["checked"] - v[key]["produced"] for key in ("corrected", "queries")) + max(0, lost - allowed_loss))


def missed_by(v: dict) -> tuple[int, int]:
    """(shortfall, verify_capped's count of capped tokens above its bound, 0 without it): what `--verify until` keeps
    the least of, in this order, when no Θ passes; so among rounds that miss by as many records the one whose removed
    values sampling reads back least easily is kept."""
    return shortfall(v), v.get("capped_above") or 0


class Verifier:
    """Greedy answers of a request's probes at any Θ of a PEFT model, and the verdict against Θ̂'s."""

    def __init__(self, model, tokenizer, params, theta_hat: torch.Tensor, records: list[Record], request: EditRequest,
                 template: str, max_length: int, batch_size: int, retained: int, seed: int, teacher_forced: bool = True,
                 extractable: float = 0.0):
        from .evaluate import AdapterEval

        self.model, self.params, self.teacher_forced, self.generated = model, params, teacher_forced, 0
        self.extractable = extractable
        self.probes = probes(request, records, retained, seed)
        # one generation per distinct prompt: a correction's old and new probes ask the same one
        key = (lambda r: repr(r.sides()[0]))
        self.asks = list({key(p.ask): p.ask for p in self.probes}.items())
        where = {k: i for i, (k, _) in enumerate(self.asks)}
        self.index = [where[key(p.ask)] for p in self.probes]
        self.own = own_responses(self.probes, self.index, len(self.asks), request)
        self.leaked: list[bool] = [False] * len(self.probes)
        # long enough for every target and for the edited records' whole answers, where a private part may sit last
        texts = [t for p in self.probes for t in p.targets] + [x.sides()[1] for e in request.edits for x in (e.old, e.new) if x]
        longest = max(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
        self.eval = AdapterEval(model, tokenizer, template, batch_size, max_length, min(longest + MARGIN_TOKENS, max_length))
        # (old record, target) of each checked removed or replaced target: a modified query's private parts are in
        # its prompt, not in an answer
        old_of = {e.id: e.old for e in request.edits if e.op != "modify_query"}
        at = [(k, old_of[p.id], t) for k, p in enumerate(self.probes) if p.kind in ("removed", "old") and p.id in old_of
              and not p.shared for t in p.targets]
        self.parts, self.part_probe = [(r, t) for _, r, t in at], [k for k, _, _ in at]
        self.base_log10p = distributed.on_main(self._base_log10p)
        self.before_log10p = distributed.on_main(lambda: self._log10p(theta_hat))
        self.before = self.hits(theta_hat)

    def _log10p(self, theta: torch.Tensor) -> list[float | None]:
        with adapter_at(self.model, self.params, theta), fused_attention(self.model), merged_adapter(self.model):
            return part_log10p(self.eval, self.parts)

    def _base_log10p(self) -> list[float | None] | None:
        """Under the base model alone (PEFT's disable_adapter); None for a model without one."""
        if not self.parts or not hasattr(self.model, "disable_adapter"):
            return None
        with self.model.disable_adapter(), fused_attention(self.model):
            return part_log10p(self.eval, self.parts)

    def hits(self, theta: torch.Tensor) -> list[bool]:
        """Per probe: whether the adapter at Θ produces one of its targets. Rank 0 generates and every rank gets
        its answer, so that all ranks take the same decisions from it."""
        return distributed.on_main(lambda: self._hits(theta))

    def _hits(self, theta: torch.Tensor) -> list[bool]:
        """A prompt whose greedy answer certainly starts with its record's response (AdapterEval.sure_answers) and
        whose every probe finds a target in that response is settled without generation: a hit found in the start
        of the answer is a hit of the whole answer. Every other prompt is answered by greedy generation.
        A new answer (a correction, a modified query) counts as produced only when it is also certain: an answer
        that greedy decoding gives on a near-tie is one that another batch, precision or device can flip
        (docs/benchmarks-history.md#verify-sure), and retraining fits a correction to near-zero loss."""
        asks = [ask for _, ask in self.asks]
        with adapter_at(self.model, self.params, theta), fused_attention(self.model), merged_adapter(self.model):
            sure, told = self.eval.sure_answers(asks, SURE_NLL)
            answers = list(sure) if self.teacher_forced else [None] * len(asks)
            settled = [a is not None for a in answers]
            for i, p in zip(self.index, self.probes):
                settled[i] = settled[i] and produced(answers[i], p.targets)
            todo = [i for i, ok in enumerate(settled) if not ok]
            for i, text in zip(todo, self.eval.generate([asks[i] for i in todo])):
                answers[i] = text
        self.generated = len(todo)
        self.leaked = leaks(self.probes, self.index, answers, self.own)
        return [produced(answers[i], p.targets) and (p.kind not in SURE_KINDS or not told[i] or produced(sure[i] or "", p.targets))
                for i, p in zip(self.index, self.probes)]

    def check(self, theta: torch.Tensor) -> dict:
        hits = self.hits(theta)
        generated, leaked = distributed.on_main(lambda: (self.generated, self.leaked))
        after = distributed.on_main(lambda: self._log10p(theta))
        return {**judge(self.probes, self.before, hits, self.likely(after), leaked), "prompts": len(self.asks),
                "generated": generated, "extraction": extraction(self.base_log10p, self.before_log10p, after)}

    def likely(self, after: list) -> list[bool] | None:
        """Per probe, with verify_extractable m > 0: a removed or replaced probe (a correction's old value) with a target
        whose log10 P at Θ exceeds the base model's by more than m (module docstring); None when off or without a base
        model."""
        if not self.extractable or self.base_log10p is None:
            return None
        out = [False] * len(self.probes)
        for k, base, x in zip(self.part_probe, self.base_log10p, after, strict=True):
            if base is not None and x is not None and x > base + self.extractable:
                out[k] = True
        return out


def extraction(base: list | None, before: list, after: list) -> dict:
    """The largest and the median log10 P of the removed and replaced targets (Verifier) under the base model, at Θ̂
    and at Θ, over those measured at all three (at Θ̂ and Θ without a base). The largest is the privacy figure: the
    target an attacker sampling answers is likeliest to read back."""
    rows = [(b, x, y) for b, x, y in zip(base or [None] * len(before), before, after, strict=True)
            if x is not None and y is not None and (base is None or b is not None)]
    out = {"targets": len(before), "measured": len(rows)}
    for k, name in enumerate(("base", "before", "after")):
        vals = sorted(r[k] for r in rows) if rows and (k or base is not None) else []
        out[name] = {"max_log10p": vals[-1], "median_log10p": statistics.median(vals)} if vals else None
    return out


def _p(log10p: float) -> str:
    """10^log10p for the terminal; written as a power below float's range (an IBAN's can be 10^-400), not as 0."""
    return f"{10 ** log10p:.2g}" if log10p > -300 else f"1e{log10p:.0f}"


def capped_bound_text(v: dict) -> str:
    """verify_capped's bound in words: "p = m·τ", or with repair_follow "m × each token's capped target"."""
    if v.get("capped_per_token"):
        return f"{v['capped_bound']:g} × their capped targets"
    return f"p = {v['capped_bound']:g}"


def summary_line(v: dict) -> str:
    """One line for the terminal: the verdict and its figures."""
    parts = []
    for key, what in (("removed", "removed answers still produced"), ("old", "replaced answers or private parts still produced")):
        f = v[key]
        if f["checked"] or f["unchecked"]:
            parts.append(f"{what} {f['still_produced']}/{f['checked']}"
                         + (f" ({f['still_produced_common']} a value kept records also hold)" if f.get("still_produced_common") else "")
                         + (f" ({f['unchecked']} unchecked: shared with kept records or inside the new answer)" if f["unchecked"] else ""))
    for key, what in (("removed", "removed"), ("old", "replaced")):
        if v[key].get("leaked"):
            parts.append(f"{what} values given in another prompt's answer {v[key]['leaked']}/{v[key]['checked']}")
        if "still_likely" in v[key] and v[key]["checked"]:
            parts.append(f"{what} answers not produced but likely by sampling {v[key]['still_likely']}/{v[key]['checked']}")
    for key, what in (("corrected", "corrections produced"), ("queries", "modified queries answered")):
        if v[key]["checked"]:
            parts.append(f"{what} {v[key]['produced']}/{v[key]['checked']}")
    k = v["retained"]
    lo, hi = wilson(k["kept"], k["produced_before"])
    parts.append(f"retained kept {k['kept']}/{k['produced_before']} of {k['sampled']} sampled "
                 f"(over every kept record, 95% interval {lo:.0%}–{hi:.0%})")
    x = v.get("extraction") or {}
    if x.get("measured"):
        base = f", base model {_p(x['base']['max_log10p'])}" if x["base"] else ""
        parts.append(f"removed or replaced values, largest chance of being sampled after their sentence "
                     f"{_p(x['after']['max_log10p'])} (before the edit {_p(x['before']['max_log10p'])}{base})")
    if v.get("capped_above") is not None:  # verify_capped's count (api.verify_edit): a failure of its own when > 0
        parts.append(f"capped tokens of {v.get('capped_of', 'removed values')} above {capped_bound_text(v)}: {v['capped_above']}")
    return ("verified: " if v["verified"] else "NOT verified: ") + "; ".join(parts)
