"""The problem a request poses at Θ̂: what Θ is, the n training samples, the edited set, and b.

    b = Σ_S [∇L(old) − ∇L(new)] at Θ̂   (the new term is 0 for a removal; unscaled: the solvers find
                                        x = n·ΔΘ, so none meets the ~1e-9 entries of b/n)
    edited set = kept samples + new versions of the edited ones, m = its size.

Everything here is read-only on the model: Θ̂ is a detached copy and every pass takes Θ explicitly.
With several processes, `batches` holds this rank's share and every sum over them is all-reduced
(distributed.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import distributed
from .data import EditRequest, Record
from .modeling import fused_attention, theta_of
from .memory import MemoryBudget
from .objective import CausalLMObjective, by_length
from .privacy import part_positions
from .render import encode, model_inputs, resolve_template
from .rhs import gradient_sum, sum_of_gradients

# bytes of stored hidden states (the layers below the adapter) a loss evaluation's batches may hold
PREFIX_BUDGET = 2**28


@dataclass
class EditSets:
    """The samples one request touches, encoded: old versions (all edits), removed, kept and new versions."""

    request: EditRequest
    old: list
    removed: list
    kept: list
    new: list

    @property
    def new_by_id(self) -> dict:
        """{edit id: encoded new version} over the edits that have one (`new` is in the request's edit order)."""
        return dict(zip([e.id for e in self.request.edits if e.new is not None], self.new))

    @property
    def edited(self) -> list:
        """The training set after the request: kept samples, then the new versions of edited ones."""
        return self.kept + self.new


class Problem:
    """Θ̂, the encoded training samples, and the sums over them that every stage needs."""

    def __init__(self, model, tokenizer, records: list[Record], template: str = "auto", max_length: int = 512,
                 batch_size: int = 8, weight_decay: float = 0.0, memory_mb: float = 0.0):
        self.model, self.tokenizer, self.records = model, tokenizer, records
        self.device = next(model.parameters()).device
        self.template = resolve_template(tokenizer, template)
        self.max_length, self.batch_size, self.weight_decay = max_length, batch_size, weight_decay
        self.params, self.theta_hat = theta_of(model)
        # what the run keeps between passes (kept linearisations, stored hidden states, p⁰): one budget (memory.py)
        self.memory = MemoryBudget(self.device, memory_mb)
        self.objective = CausalLMObjective(model, tokenizer.pad_token_id)
        # batches evaluated many times (CG's, the line search's) skip the layers below the adapter's lowest
        self.objective.freeze_prefix(self.params.names)
        self.examples = [self.encode(r) for r in records]
        # Σ∇L(old) at Θ̂ per request (by edited indices); a Problem of the same model and data may share it
        self.old_grads: dict[tuple, torch.Tensor] = {}
        self._sets: dict[int, EditSets] = {}
        # support.capped_positions per (id of the request object, capped_chars, capped_words): (request, result); the
        # first step, the Newton refiner, the gradient rounds and verify_capped all read the same count of the kept
        # records
        self._capped: dict[tuple, tuple] = {}

    @property
    def n(self) -> int:
        """The size of the set Θ̂ was trained on."""
        return len(self.records)

    def sets(self, request: EditRequest) -> EditSets:
        """The request's samples, encoded once per request object."""
        if id(request) not in self._sets or self._sets[id(request)].request is not request:
            edited = {e.index for e in request.edits}
            self._sets[id(request)] = EditSets(
                request, [self.examples[e.index] for e in request.edits],
                [self.examples[e.index] for e in request.edits if e.op == "remove"],
                [x for i, x in enumerate(self.examples) if i not in edited],
                [self.encode(e.new) for e in request.edits if e.new is not None])
        return self._sets[id(request)]

    def encode(self, record: Record):
        return encode(record, self.tokenizer, self.template, self.max_length, **model_inputs(self.model))

    def part_positions(self, record: Record, parts) -> list[int] | None:
        """Indices, among the response tokens of `encode(record)`, of the tokens of any of `parts`
        (privacy.part_positions); None when no part is marked or none can be located."""
        return part_positions(self.tokenizer, self.template, record, parts)

    def grad_sum(self, items, theta, desc: str, progress: bool) -> torch.Tensor:
        """Σ_i ∇L(z_i; Θ) over `items`."""
        with fused_attention(self.model):  # first order: no double backward through attention here
            return sum_of_gradients(self.objective, self.params, theta, items, self.batch_size, self.device, desc, progress)

    def grad_sum_of_batches(self, batches, theta, desc: str, progress: bool) -> torch.Tensor:
        with fused_attention(self.model):
            return gradient_sum(self.objective, self.params, theta, batches, desc, progress)

    def old_grad(self, request: EditRequest, progress: bool = True) -> torch.Tensor:
        """Σ_S ∇L(old) at Θ̂, computed once per request: b and the control variate both need it."""
        key = tuple(e.index for e in request.edits)
        if key not in self.old_grads:
            self.old_grads[key] = self.grad_sum([self.examples[i] for i in key], self.theta_hat, "b: old samples", progress)
        return self.old_grads[key]

    def rhs(self, request: EditRequest, progress: bool = True) -> torch.Tensor:
        """b = Σ_S [∇L(old) − ∇L(new)] at Θ̂, unscaled."""
        def compute():
            b = self.old_grad(request, progress).clone()
            new = self.sets(request).new
            if new:
                b -= self.grad_sum(new, self.theta_hat, "b: new samples", progress)
            return b
        # b's passes are gradients on batches like the curvature's: what they briefly took sizes the first kept
        # linearisation before it is built (memory.MemoryBudget.estimate)
        return self.memory.measure("gradient", compute)

    def batches(self, items, prepare: bool = True) -> list[dict]:
        """`items` in batches by length, for loss values at many Θ. With `prepare`, each of the first
        batches up to PREFIX_BUDGET bytes stores the output of the layers below the adapter, so later
        passes start above them (`CausalLMObjective.prepare`; with the attention kernel the loss passes use).
        With several processes: this rank's share of `items` only (`loss_sum` and `grad_sum_of_batches` add the others')."""
        items, bs, out, used = distributed.shard(by_length(items)), self.batch_size, [], 0
        with torch.no_grad(), fused_attention(self.model):
            for i in range(0, len(items), bs):
                batch = self.objective.collate(items[i:i + bs], self.device)
                if prepare and used < PREFIX_BUDGET:
                    batch = self.objective.prepare(batch)
                    if "prefix" in batch:
                        used += batch["prefix"].numel() * batch["prefix"].element_size()
                out.append(batch)
        return out

    def worst_token_nll(self, items, theta) -> list[float]:
        """Per item, in the order given: max_t −log p(y_t | prompt, y_<t; Θ) over its response tokens. Below ln 2
        every token has p > ½, so it is the greedy choice: greedy decoding then reproduces the whole answer
        (verify.CERTAIN_NLL). One teacher-forced pass per batch, on this process alone."""
        order = sorted(range(len(items)), key=lambda i: len(getattr(items[i], "input_ids", ())))
        out = [0.0] * len(items)
        with torch.no_grad(), fused_attention(self.model):
            for j in range(0, len(order), self.batch_size):
                idx = order[j:j + self.batch_size]
                batch = self.objective.collate([items[i] for i in idx], self.device)
                worst = self.objective.worst_token_losses(self.objective.outputs(self.params.unflatten(theta), batch), batch)
                for i, v in zip(idx, worst.tolist()):
                    out[i] = v
        return out

    def loss_sum(self, batches: list[dict], theta) -> float:
        """Σ_i L(z_i; Θ) over already batched samples (this rank's share of `batches`, summed over ranks)."""
        total = 0.0
        with torch.no_grad(), fused_attention(self.model):
            for batch in batches:
                total += float(self.objective.losses(self.objective.outputs(self.params.unflatten(theta), batch), batch).sum())
        return distributed.all_sum_float(total)
