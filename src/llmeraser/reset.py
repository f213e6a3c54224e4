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
The base model is not what retraining predicts for those prompts (that is the kept data's
generalisation, which this target leaves to the kept samples' curvature), so the term is off by default
and meant for memorised private data.

Private parts only (`parts`, the setting verify_reset = 'parts'): for a removed record whose request marks
its private parts, the target is the base model's logits at the parts' tokens T_u only and the adapter's
own at Θ̂ elsewhere,
    z*_t = z_t(Θ₀) for t ∈ T_u,   z*_t = z_t(Θ̂) otherwise,
so d_t = 0 at Θ̂ outside T_u: those tokens add curvature only and hold the sentence around the value as
the adapter gives it, while the value's tokens are pulled to the base model's prediction. Why: pulling the
whole answer toward the base model, step after step, lowers the value's probability but garbles the
sentence, which retraining still answers in (docs/design.md#verify-reset).

Capped targets (`capped`, the setting reset_target = 'capped'): at the tokens T_c of a removed record that the kept
records do not predict (support.py), the target q* is the KL projection onto {q : q_y ≤ τ} of p̂_t mixed with what
the kept records write after the same context (support.capped_target), and Θ̂'s own logits elsewhere; the metric is
F̄ at p̄ = ½(q* + p̂). Why: the base model's prediction after "…'s IBAN is" is not an IBAN, and pulling toward it gave
garble where retraining answers with another value of the same form (BENCHMARKS.md#forgetting-capped).

A correction's old record is pulled only at its parts' tokens after the first token where its old and new
answers differ (`past_shared_prefix`): up to and at that token both records see the same context, so pulling
the old record there toward the base model pulls the new answer, which the same step teaches, away from itself.
"""

from __future__ import annotations

import torch

from . import distributed
from .curvature import Curvature, fisher_product
from .memory import MemoryBudget
from .modeling import fused_attention
from .objective import by_length, wide, wide_softmax
from .params import zero_adapter  # noqa: F401  (re-exported: Θ₀ is part of this module's story)
from .support import capped_target


def first_difference(old, new) -> int:
    """The index, among `old`'s response tokens, of the first token where the token sequences of `old` and `new`
    (render.Example) differ; negative when the prompts already differ, past the end when one starts the other."""
    a, b = old.input_ids, new.input_ids
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b))) - old.n_prompt


def past_shared_prefix(old, new, at) -> list[int]:
    """The indices of `at` (among `old`'s response tokens) that come after first_difference(old, new). Invariant: at
    each kept index the two records' contexts differ, so the old record's target there says nothing about the new
    answer's tokens; with different prompts every index is kept."""
    first = first_difference(old, new)
    return [k for k in at if k > first]


def pulled_tokens(items: list, parts: dict) -> torch.Tensor:
    """Over a batch's response tokens, in collate's order (item by item, each response in order): True where
    the target is the base model's: the tokens `parts` lists for an item, every token of an item it omits."""
    out = []
    for e in items:
        at = parts.get(id(e))
        m = torch.zeros(e.n_response, dtype=torch.bool)
        m[slice(None) if at is None else [k for k in at if k < e.n_response]] = True
        out.append(m)
    return torch.cat(out)


class OutputReset:
    """P(Θ) above over the removed records: value, gradient and Gauss-Newton products at Θ̂."""

    def __init__(self, objective, params, theta_hat: torch.Tensor, examples: list, batch_size: int, device,
                 anchor: bool = False, memory: MemoryBudget | None = None, parts: dict | None = None,
                 capped: dict | None = None, cap: float = 0.02, own: float = 0.0):
        """`anchor`: the target is the adapter's own outputs at Θ̂ instead of the base model's (the
        --anchor-kept term: zero and flat at Θ̂, it only adds curvature), and the metric the base model's
        Fisher F⁰; otherwise the metric is F̄ above. `parts`: {id(example): indices among its response tokens}
        of the examples whose target is the base model's at those tokens only and Θ̂'s elsewhere (module
        docstring); an example not in it is pulled at every response token. `capped`: {id(example): indices among its
        response tokens, or {index: kept continuation distribution or None}} of capped targets at probability `cap`
        there (support.capped_target, the adapter's own share bounded by `own` when > 0) and Θ̂'s elsewhere (an example
        it omits is held at every token); it replaces the base-model target and `parts`."""
        self.objective, self.params, self.theta_hat = objective, params, theta_hat.detach()
        examples = distributed.shard(by_length(examples))  # this rank's share; value, grad, product sum over ranks
        theta0 = zero_adapter(params, self.theta_hat)
        # the same attention kernel as value() and grad(), so that d is exactly 0 at the target
        with torch.no_grad(), fused_attention(objective.model):
            self.batches = [objective.prepare(objective.collate(examples[i:i + batch_size], device))
                            for i in range(0, len(examples), batch_size)]
            base = [objective.outputs(params.unflatten(theta0), b).detach() for b in self.batches] \
                if capped is None or anchor else None  # a capped target needs only Θ̂'s outputs
            hat = [objective.outputs(params.unflatten(self.theta_hat), b).detach() for b in self.batches]
        self.capped_tokens = None  # how many tokens have a capped target, over every rank
        if anchor:
            self.targets, self.probs = [wide(t) for t in hat], [wide_softmax(t) for t in base]
        elif capped is not None:
            chunks = [examples[i:i + batch_size] for i in range(0, len(examples), batch_size)]
            masks = [pulled_tokens(c, {id(x): sorted(capped.get(id(x), ())) for x in c}) for c in chunks]
            self.targets = []
            for c, m, t, b in zip(chunks, masks, hat, self.batches):
                # each capped row's kept continuation distribution, in the mask's order (item by item, token by token)
                kept = [at.get(k) if isinstance(at, dict) else None for x in c
                        for at in [capped.get(id(x), ())] for k in sorted(at)]
                target, m = wide(t).clone(), m.to(t.device)
                target[m] = capped_target(target[m], b["targets"][m], kept, cap, own)
                self.targets.append(target)
            self.probs = [0.5 * (wide_softmax(z) + wide_softmax(t)) for z, t in zip(self.targets, hat)]
            self.capped_tokens = distributed.all_sum_float(float(sum(int(m.sum()) for m in masks)))
        else:
            self.probs = [0.5 * (wide_softmax(t0) + wide_softmax(t)) for t0, t in zip(base, hat)]
            self.targets = [wide(t0) for t0 in base]
            if parts:
                masks = [pulled_tokens(examples[i:i + batch_size], parts) for i in range(0, len(examples), batch_size)]
                self.targets = [torch.where(m.to(t0.device)[:, None], wide(t0), wide(t))
                                for m, t0, t in zip(masks, base, hat)]
        self._linear = None  # per batch: its kept linearisation, or None where the memory budget did not keep it
        self._linear_mb = 0.0
        self._curvature = Curvature(objective, params, self.theta_hat, "ggn")
        self.memory = memory if memory is not None else MemoryBudget(device)

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
