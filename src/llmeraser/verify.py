"""Did the edit take? Checked by greedy generation, as a user would check it by hand.

Each probe asks the adapter one record's prompt and looks for target strings in its greedy answer,
compared case-folded and without whitespace (a hit: any target occurs in the answer; "555 1234" gives
away "5551234", and some tokenizers decode with spaces between tokens):

    remove            removed   the edit's 'private' parts, else the old response      must be absent
    correct_response  new       the new response                                       must be present
                      old       the old 'private' parts, else the old response         must be absent
    modify_query      new       the response, asked with the new prompt                must be present
                      old       the 'private' parts of the old prompt, if marked       must be absent
    retained sample   retained  the response of a kept record (seeded sample)          must stay present

An old response that a kept record also gives (a label such as "Yes.", a common attribute) is not the
removed record's own: retraining without it gives the same answer, so it is not checked ('shared');
mark the private part of such a record with 'private'. The retained share counts only answers the
adapter produced before the edit: one it never produced is not lost by the edit.

    verified = no checked removed or old target produced, every new target produced, and at least
               RETAINED_KEPT_MIN of the retained answers produced before still produced.

No generated text is stored: the answers to removed prompts are the private data being removed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .curvature import seeded_subset
from .data import EditRequest, Record
from .modeling import adapter_at, fused_attention, merged_adapter

RETAINED_KEPT_MIN = 0.95  # the scenario suite's pass criterion for retained fields (BENCHMARKS.md)
MARGIN_TOKENS = 8  # generated beyond the longest target, so a target after a short preamble is still seen


def normalise(text: str) -> str:
    return "".join(text.split()).casefold()


def produced(answer: str, targets: tuple[str, ...]) -> bool:
    """Whether any target occurs in the answer, case-folded and with whitespace removed."""
    a = normalise(answer)
    return any(normalise(t) in a for t in targets)


@dataclass(frozen=True)
class Probe:
    id: str  # the record's id
    kind: str  # removed, old, new or retained
    ask: Record  # whose prompt is asked
    targets: tuple[str, ...]
    shared: bool = False  # a removed or old answer a kept record also gives: not checked


def probes(request: EditRequest, records: list[Record], retained: int, seed: int) -> list[Probe]:
    """The probes of a request, edits first, then a seeded sample of `retained` kept records."""
    edited = {e.id for e in request.edits}
    kept = [r for r in records if r.id not in edited]
    kept_answers = {normalise(r.sides()[1]) for r in kept}
    out = []
    for e in request.edits:
        old_response = e.old.sides()[1]
        if e.op == "modify_query":
            out.append(Probe(e.id, "new", e.new, (old_response,)))
            if e.private:  # a private field of the old query must not surface in the answer to the new one
                out.append(Probe(e.id, "old", e.new, e.private))
            continue
        # without 'private' marks the whole old answer is the target; shared with a kept record, it is unchecked
        shared = not e.private and normalise(old_response) in kept_answers
        if e.op == "remove":
            out.append(Probe(e.id, "removed", e.old, e.private or (old_response,), shared))
        else:
            new_response = e.new.sides()[1]
            old_targets = e.private or (old_response,)
            # an old target inside the new answer cannot be absent from a correct one
            unchecked = shared or any(normalise(t) in normalise(new_response) for t in old_targets)
            out.append(Probe(e.id, "new", e.new, (new_response,)))
            out.append(Probe(e.id, "old", e.new, old_targets, unchecked))
    out += [Probe(r.id, "retained", r, (r.sides()[1],)) for r in seeded_subset(kept, retained, seed)[:retained]]
    return out


def judge(probe_list: list[Probe], before: list[bool], after: list[bool]) -> dict:
    """The verification's figures and verdict from each probe's hit before and after the edit."""
    rows = list(zip(probe_list, before, after))

    def of(kind, checked_only=True):
        return [(b, a) for p, b, a in rows if p.kind == kind and not (checked_only and p.shared)]

    removed, old, new, retained = of("removed"), of("old"), of("new"), of("retained")
    kept_before = sum(b for b, _ in retained)
    kept = sum(b and a for b, a in retained)
    share = kept / kept_before if kept_before else 1.0
    figures = {
        "removed": {"checked": len(removed), "unchecked_shared": len(of("removed", False)) - len(removed),
                    "produced_before": sum(b for b, _ in removed), "still_produced": sum(a for _, a in removed)},
        "corrected": {"checked": len(new), "produced": sum(a for _, a in new), "produced_before": sum(b for b, _ in new),
                      "old_checked": len(old), "old_still_produced": sum(a for _, a in old)},
        "retained": {"sampled": len(retained), "produced_before": kept_before, "kept": kept, "kept_share": share},
    }
    failures = []
    if figures["removed"]["still_produced"]:
        failures.append(f"{figures['removed']['still_produced']} of {len(removed)} removed answers still produced")
    if figures["corrected"]["produced"] < len(new):
        failures.append(f"{len(new) - figures['corrected']['produced']} of {len(new)} corrections not produced")
    if figures["corrected"]["old_still_produced"]:
        failures.append(f"{figures['corrected']['old_still_produced']} of {len(old)} replaced answers still produced")
    if share < RETAINED_KEPT_MIN:
        failures.append(f"{kept} of {kept_before} sampled retained answers kept (< {RETAINED_KEPT_MIN:.0%})")
    records = [{"id": p.id, "kind": p.kind, "checked": not p.shared, "before": b, "after": a} for p, b, a in rows]
    return {"verified": not failures, "failures": failures, **figures, "records": records}


class Verifier:
    """Greedy answers of a request's probes at any Θ of a PEFT model, and the verdict against Θ̂'s."""

    def __init__(self, model, tokenizer, params, theta_hat: torch.Tensor, records: list[Record], request: EditRequest,
                 template: str, max_length: int, batch_size: int, retained: int, seed: int):
        from .evaluate import AdapterEval

        self.model, self.params = model, params
        self.probes = probes(request, records, retained, seed)
        # one generation per distinct prompt: a correction's old and new probes ask the same one
        key = (lambda r: repr(r.sides()[0]))
        self.asks = list({key(p.ask): p.ask for p in self.probes}.items())
        where = {k: i for i, (k, _) in enumerate(self.asks)}
        self.index = [where[key(p.ask)] for p in self.probes]
        longest = max(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for p in self.probes for t in p.targets)
        self.eval = AdapterEval(model, tokenizer, template, batch_size, max_length, min(longest + MARGIN_TOKENS, max_length))
        self.before = self.hits(theta_hat)

    def hits(self, theta: torch.Tensor) -> list[bool]:
        """Per probe: whether the adapter at Θ produces one of its targets."""
        with adapter_at(self.model, self.params, theta), fused_attention(self.model), merged_adapter(self.model):
            answers = self.eval.generate([ask for _, ask in self.asks])
        return [produced(answers[i], p.targets) for i, p in zip(self.index, self.probes)]

    def check(self, theta: torch.Tensor) -> dict:
        return judge(self.probes, self.before, self.hits(theta))


def shortfall(v: dict) -> int:
    """How many checks a verification misses by, in records: removed or replaced answers still produced,
    corrections missing, and retained answers lost beyond what RETAINED_KEPT_MIN allows. 0 when verified."""
    r, c, k = v["removed"], v["corrected"], v["retained"]
    allowed_loss = k["produced_before"] - math.ceil(RETAINED_KEPT_MIN * k["produced_before"] - 1e-9)
    lost = k["produced_before"] - k["kept"]
    return r["still_produced"] + (c["checked"] - c["produced"]) + c["old_still_produced"] + max(0, lost - allowed_loss)


def summary_line(v: dict) -> str:
    """One line for the terminal: the verdict and its figures."""
    r, c, k = v["removed"], v["corrected"], v["retained"]
    parts = []
    if r["checked"] or r["unchecked_shared"]:
        parts.append(f"removed answers still produced {r['still_produced']}/{r['checked']}"
                     + (f" ({r['unchecked_shared']} shared with kept records, unchecked)" if r["unchecked_shared"] else ""))
    if c["checked"]:
        parts.append(f"corrections produced {c['produced']}/{c['checked']}")
    if c["old_checked"]:
        parts.append(f"replaced answers still produced {c['old_still_produced']}/{c['old_checked']}")
    parts.append(f"retained kept {k['kept']}/{k['produced_before']} of {k['sampled']} sampled")
    return ("verified: " if v["verified"] else "NOT verified: ") + "; ".join(parts)
