"""Removed records: pull their outputs back toward the base model's (`--reset-removed`, an
extension of the paper's update).

Why this exists. At an adapter that memorised its data (training loss ~1e-3), a removed sample's
gradient is ~0, so its influence term in b is ~0 and the edited objective is flat between "remembers
the removed customer" and "does not": both fit the kept data. Retraining from the zero adapter
decides that by its implicit bias, which no local model of the loss sees (docs/design.md#reset-removed).
In the lazy-training picture that bias has a closed form: retraining changes the removed inputs'
outputs by exactly the part of the adapter's effect on them that the kept data do not explain.

The penalty that encodes it, added to the edited objective with weight ρ:
    P(Θ) = Σ_{removed i} ½ Σ_t (1/T_i) d_tᵀ F̄_t d_t,   d_t = z_t(Θ) − z_t(Θ₀),
z_t the logits at the removed record's response tokens, T_i their count, Θ₀ = Θ with every lora_B set
to zero (the base model exactly), F̄_t = diag(p̄) − p̄p̄ᵀ the softmax Fisher at p̄ = ½(p⁰ + p̂), the mean
of the base model's prediction p⁰ and the adapter's p̂ at Θ̂. F̄ weighs a logit by how likely either
model finds its token: the tokens the base would say, and the memorised answer's. (A plain squared
distance is dominated by the bulk of unlikely tokens; the base model's Fisher F⁰ alone barely weighs the
memorised tokens, which the base finds unlikely: docs/design.md#reset-metric.) Its Gauss-Newton
curvature Jᵀ F̄ J and gradient Jᵀ F̄ d join the solve's operator and right-hand side; the kept samples'
curvature holds their answers in place, so the step resets what the removed records alone depend on.
With `reset_private`, the sum over t runs over the tokens of the request's "private" parts only (T_i their
count): the rest of the answer is wording the kept records share, and pulling it toward the base model's
moves every record's answer (BENCHMARKS.md#forgetting-n128-s1-sweep).
The base model is not what retraining predicts for those prompts (that is the kept data's
generalisation, which this target leaves to the kept samples' curvature), so the term is off by default
and meant for memorised private data.
"""

from __future__ import annotations

import itertools
import re

import torch

from . import distributed
from .curvature import Curvature, fisher_product
from .memory import MemoryBudget
from .modeling import fused_attention
from .objective import by_length, wide, wide_softmax
from .params import zero_adapter  # noqa: F401  (re-exported: Θ₀ is part of this module's story)


def private_token_mask(tokenizer, example, parts) -> tuple[bool, ...] | None:
    """Per response token of `example`, whether its text overlaps one of the strings `parts`; None (every token
    counts) when `parts` is empty or no token overlaps. Token k spans the characters
    [len(decode(ids[:k])), len(decode(ids[:k+1]))) of the decoded response; a tokenizer whose decode joins tokens
    with spaces (word-level) is read as the concatenation of its tokens' own decodings instead."""
    ids = list(example.input_ids[example.n_prompt:])
    if not parts or not ids:
        return None
    readings = ([tokenizer.decode(ids[:k + 1]) for k in range(len(ids))],
                list(itertools.accumulate(tokenizer.decode([i]) for i in ids)))
    for prefixes in readings:
        ends = [len(x) for x in prefixes]
        spans = [(m.start(), m.end()) for part in parts for m in re.finditer(re.escape(part), prefixes[-1])]
        mask = tuple(any(a < end and start < b for a, b in spans) for start, end in zip([0] + ends[:-1], ends))
        if any(mask):
            return mask
    return None


def removed_private_masks(problem, request, examples: list) -> list:
    """`private_token_mask` of each of `examples` (removed records of `request`) for its edit's private parts."""
    parts = {id(problem.examples[e.index]): e.private for e in request.edits if e.op == "remove"}
    return [private_token_mask(problem.tokenizer, x, parts.get(id(x), ())) for x in examples]


class OutputReset:
    """P(Θ) above over the removed records: value, gradient and Gauss-Newton products at Θ̂."""

    def __init__(self, objective, params, theta_hat: torch.Tensor, examples: list, batch_size: int, device,
                 anchor: bool = False, memory: MemoryBudget | None = None, masks: list | None = None):
        """`anchor`: the target is the adapter's own outputs at Θ̂ instead of the base model's (the
        --anchor-kept term: zero and flat at Θ̂, it only adds curvature), and the metric the base model's
        Fisher F⁰; otherwise the metric is F̄ above. `masks`: per example, the response tokens P sums over
        (`private_token_mask`; None: all)."""
        self.objective, self.params, self.theta_hat = objective, params, theta_hat.detach()
        mask_of = {id(x): m for x, m in zip(examples, masks)} if masks is not None else {}
        examples = distributed.shard(by_length(examples))  # this rank's share; value, grad, product sum over ranks
        chunks = [examples[i:i + batch_size] for i in range(0, len(examples), batch_size)]
        theta0 = zero_adapter(params, self.theta_hat)
        # the same attention kernel as value() and grad(), so that d is exactly 0 at the target
        with torch.no_grad(), fused_attention(objective.model):
            self.batches = [objective.prepare(objective.collate(c, device)) for c in chunks]
            base = [objective.outputs(params.unflatten(theta0), b).detach() for b in self.batches]
            hat = [objective.outputs(params.unflatten(self.theta_hat), b).detach() for b in self.batches]
        if anchor:
            self.targets, self.probs = [wide(t) for t in hat], [wide_softmax(t) for t in base]
        else:
            self.targets, self.probs = [wide(t) for t in base], [0.5 * (wide_softmax(t0) + wide_softmax(t)) for t0, t in zip(base, hat)]
        if any(m is not None for m in mask_of.values()):
            for j, c in enumerate(chunks):
                self.probs[j] = self._only(self.batches[j], self.probs[j], c, mask_of)
        self._linear = None  # per batch: its kept linearisation, or None where the memory budget did not keep it
        self._linear_mb = 0.0
        self._curvature = Curvature(objective, params, self.theta_hat, "ggn")
        self.memory = memory if memory is not None else MemoryBudget(device)

    @staticmethod
    def _only(batch: dict, p: torch.Tensor, chunk: list, mask_of: dict) -> torch.Tensor:
        """p with the rows of unmasked tokens zeroed (F = diag p − ppᵀ is then 0 there) and the batch's T_i set to
        each record's masked-token count, so that every term of P, its gradient and its curvature skips them."""
        keep = torch.tensor([t for x in chunk for t in (mask_of.get(id(x)) or (True,) * x.n_response)],
                            device=batch["rows"].device)
        counts = torch.zeros_like(batch["counts"]).index_add_(0, batch["rows"], keep.to(batch["counts"].dtype))
        batch["counts"] = counts.clamp(min=1)
        return p * keep[:, None].to(p.dtype)

    def _penalty(self, theta, batch, target, p):
        d = wide(self.objective.outputs(self.params.unflatten(theta), batch)) - target
        return 0.5 * (d * fisher_product(p, batch, d)).sum()

    def value(self, theta: torch.Tensor) -> float:
        with torch.no_grad(), fused_attention(self.objective.model):
            local = sum(float(self._penalty(theta, *x)) for x in zip(self.batches, self.targets, self.probs))
        return distributed.all_sum_float(local)

    def grad(self, theta: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(self.theta_hat)
        with torch.enable_grad(), fused_attention(self.objective.model):
            for x in zip(self.batches, self.targets, self.probs):
                th = theta.detach().clone().requires_grad_(True)
                (g,) = torch.autograd.grad(self._penalty(th, *x), th)
                out += g
        return distributed.all_sum(out)

    def _linearise(self, batch, p, keep: bool = True):
        return self._curvature.linearise(batch, keep, head=lambda z, b, v: fisher_product(p, b, v))

    def product(self, v: torch.Tensor) -> torch.Tensor:
        """Σ_i J_iᵀ F_i J_i v at Θ̂ (the penalty's Gauss-Newton curvature), through kept linearisations where the
        memory budget keeps them (memory.py) and by fresh products elsewhere."""
        if self._linear is None:
            self._linear = []
            for b, p in zip(self.batches, self.probs):
                built, mb = self.memory.keep("reset", lambda b=b, p=p: self._linearise(b, p))
                self._linear.append(built)
                self._linear_mb += mb
        out = torch.zeros_like(self.theta_hat)
        for f, b, p in zip(self._linear, self.batches, self.probs):
            out += f(v) if f is not None else self._linearise(b, p, keep=False)(v)
        return distributed.all_sum(out)

    def release(self) -> None:
        """Drop the kept linearisations of `product` (value and grad do not need them)."""
        if self._linear is not None:
            self.memory.free("reset", self._linear_mb, sum(f is not None for f in self._linear))
        self._linear, self._linear_mb = None, 0.0
